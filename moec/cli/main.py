"""`moec` command group: registers every stage command and turns MoecError into one-line errors."""

from __future__ import annotations

import logging
import os
import sys

import click

from moec.cli.build_cmd import build_cmd
from moec.cli.compile_cmd import compile_cmd
from moec.cli.eval_cmd import eval_cmd
from moec.cli.export_cmd import export_cmd
from moec.cli.farm_cmd import farm_cmd
from moec.cli.finetune_cmd import finetune_cmd
from moec.cli.inspect_cmd import inspect_cmd
from moec.cli.keygen_cmd import keygen_cmd
from moec.cli.profile_cmd import profile_cmd
from moec.cli.run_cmd import run_cmd
from moec.cli.search_cmd import search_cmd
from moec.cli.targets_cmd import targets_cmd
from moec.core.errors import MoecError
from moec.core.outputs import install_signal_cleanup, interrupted

class MoecGroup(click.Group):
    """Group that prints user errors as one line and exits non-zero (no traceback)."""

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


cli.add_command(profile_cmd)
cli.add_command(eval_cmd)
cli.add_command(finetune_cmd)
cli.add_command(search_cmd)
cli.add_command(compile_cmd)
cli.add_command(build_cmd)
cli.add_command(run_cmd)
cli.add_command(targets_cmd)
cli.add_command(export_cmd)
cli.add_command(inspect_cmd)
cli.add_command(farm_cmd)
cli.add_command(keygen_cmd)


def main() -> None:
    cli(prog_name="moec")
