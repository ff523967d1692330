"""User-facing error type: anything raised as MoecError is printed as one line by the CLI."""


class MoecError(Exception):
    """An error caused by user input (bad path, bad checkpoint, bad plan, ...).

    The CLI prints ``error: <message>`` and exits non-zero, without a traceback.
    """
