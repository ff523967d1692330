"""`moec build`: lower a moec ONNX export through TVM into a bundle (the last stage alone)."""

from __future__ import annotations

import click

from moec import api
from moec.cli.common import activations_option, output_options


@click.command("build")
@click.argument("model", type=click.Path())
@click.option("--target", default="host", show_default=True, help="Target preset name or preset YAML path.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Bundle directory to write.")
@output_options
@click.option("--debug-dump", type=click.Path(file_okay=False), default=None,
              help="Write the IR after each lowering phase into this directory.")
@activations_option
def build_cmd(model, target, out, force, sign_key, debug_dump, activations):
    """Build MODEL (an export directory or its decode.onnx) into a bundle for a target."""

    def on_stage(name: str, seconds: float) -> None:
        click.echo(f"  ✓ {name:<24} {seconds:6.1f} s")

    path = api.build_from_onnx(model, out, target, debug_dump, on_stage=on_stage, activations=activations,
                                force=force, sign_key=sign_key)
    click.echo(f"bundle written to {path}")
