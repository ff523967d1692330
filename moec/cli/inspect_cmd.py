"""`moec inspect`: show the plan and metadata of an exported ONNX model or a bundle."""

from __future__ import annotations

import click

from moec import api
from moec.cli.common import echo_json


@click.command("inspect")
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the inspection as JSON.")
def inspect_cmd(path, as_json):
    """Show the bit plan (layer × expert table), sizes and metadata of PATH (.onnx or bundle directory)."""
    from moec.export.inspect_onnx import OnnxInspection, format_inspection

    ins = api.inspect_file(path)
    if isinstance(ins, OnnxInspection):
        if as_json:
            echo_json(ins.to_dict())
        else:
            click.echo(format_inspection(ins))
        return
    from moec.artifact.inspect_bundle import format_bundle
    if as_json:
        echo_json(ins)
    else:
        click.echo(format_bundle(ins))
