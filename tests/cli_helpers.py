"""Helpers of the CLI tests: invoke ``moec`` in-process and check one-line errors."""

from __future__ import annotations

from click.testing import CliRunner

from moec.cli.main import cli


def run(*args) -> tuple[int, str]:
    """(exit code, stripped output) of ``moec ARGS...``."""
    res = CliRunner().invoke(cli, [str(a) for a in args])
    return res.exit_code, res.output.strip()


def assert_one_line_error(code: int, out: str, needle: str) -> None:
    """A non-zero exit whose whole output is one ``error:`` line containing ``needle``."""
    assert code != 0
    lines = out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), out
    assert needle in lines[0], out
