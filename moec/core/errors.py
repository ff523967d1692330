"""User-facing error type: anything raised as MoecError is printed as one line by the CLI."""

import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]")


def _one_line(message: str) -> str:
    """``message`` with control characters (newlines from user input included) shown escaped."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1] if m.group() != "\u2028" else "\\u2028", message)


class MoecError(Exception):
    """An error caused by user input (bad path, bad checkpoint, bad plan, ...).

    The CLI prints ``error: <message>`` and exits non-zero, without a traceback. The message is
    always one line: control characters that user input brings in (newlines, NULs) are escaped.
    """

    def __init__(self, message: object = "", *args) -> None:
        super().__init__(_one_line(str(message)), *args)


def last_line(exc: BaseException) -> str:
    """The last non-blank line of ``exc``'s message (a TVM error's summary after its backtrace), else its type."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__
