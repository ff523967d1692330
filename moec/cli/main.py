"""`moec` command group: registers every stage command and turns MoecError into one-line errors."""

from __future__ import annotations

import importlib
import logging
import os
import sys

import click

from moec.core.errors import MoecError
from moec.core.outputs import install_signal_cleanup, interrupted

#: Command name -> module of ``moec.cli`` defining it (``<name>_cmd``), in ``moec --help`` order. Commands are
#: imported when used, so a device with only the TVM runtime (no compiler library) can still ``moec run``.
COMMANDS = {"profile": "profile_cmd", "eval": "eval_cmd", "finetune": "finetune_cmd", "search": "search_cmd",
            "compile": "compile_cmd", "build": "build_cmd", "run": "run_cmd", "targets": "targets_cmd",
            "export": "export_cmd", "inspect": "inspect_cmd", "farm": "farm_cmd", "keygen": "keygen_cmd"}


def _missing_compiler(name: str) -> click.Command:
    """Stand-in for a command whose imports need TVM's compiler library where only its runtime is installed."""
    why = (f"`moec {name}` needs Apache TVM's compiler library (libtvm_compiler), which this TVM install lacks; "
           "with the TVM runtime alone, `moec run` runs bundles built elsewhere")

    def refuse(**_):
        raise MoecError(why)
    return click.Command(name, callback=refuse, help=why, short_help="(needs the TVM compiler library)",
                         context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
                         params=[click.Argument(["args"], nargs=-1, required=False)])


class MoecGroup(click.Group):
    """Group that prints user errors as one line and exits non-zero (no traceback); commands load lazily."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS) + [n for n in super().list_commands(ctx) if n not in COMMANDS]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return super().get_command(ctx, name)
        module = COMMANDS[name]
        try:
            mod = importlib.import_module(f"moec.cli.{module}")
        except (ImportError, AttributeError):  # TVM's Python compiler modules fail either way without its library
            from moec.runtime.tvm_runtime import runtime_only
            if not runtime_only():
                raise
            return _missing_compiler(name)
        return getattr(mod, module)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MoecError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            _exit_interrupted()
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise
        except Exception as exc:  # a bug: keep it to one line unless asked for the traceback
            if interrupted():  # e.g. TVM re-raises a KeyboardInterrupt as RuntimeError
                _exit_interrupted()
            if os.environ.get("MOEC_DEBUG"):
                raise
            click.echo(f"internal error: {type(exc).__name__}: {exc} (set MOEC_DEBUG=1 for a traceback)", err=True)
            sys.exit(1)


def _exit_interrupted() -> None:
    """One line and exit 130; temp dirs are already gone (``finally`` blocks ran). Native libraries
    (TVM) warn about half-built objects on their way down: that noise is not for the user."""
    click.echo("interrupted", err=True)
    sys.stderr.flush()
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    except OSError:
        pass
    sys.exit(130)


@click.group(cls=MoecGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
@click.version_option(package_name="moec")
def cli(verbose: bool) -> None:
    """moec: compile Mixture-of-Experts models with a bit-width per expert for edge devices.

    Stages: profile → search → export → build (compile runs them all); run and inspect
    use the result; targets and farm describe and reach the hardware.
    """
    install_signal_cleanup()
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")


def main() -> None:
    cli(prog_name="moec")


if __name__ == "__main__":
    main()
