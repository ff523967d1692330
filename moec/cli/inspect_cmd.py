"""`moec inspect`: show the plan and metadata of an exported ONNX model (bundles to follow)."""

from __future__ import annotations

import click

from moec import api
from moec.cli.common import echo_json


@click.command("inspect")
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the inspection as JSON.")
def inspect_cmd(path, as_json):
    """Show the bit plan (layer × expert table), average bits and sizes recorded in PATH (.onnx)."""
    from moec.export.inspect_onnx import OnnxInspection, format_inspection

    ins = api.inspect_file(path)
    if isinstance(ins, OnnxInspection):
        if as_json:
            echo_json(ins.to_dict())
        else:
            click.echo(format_inspection(ins))
