"""`moec compile`: checkpoint → (profile) → plan → build → bundle, one line per finished stage."""

from __future__ import annotations

import click

from moec import api
from moec.cli.common import data_config


@click.command("compile")
@click.argument("checkpoint", type=click.Path())
@click.option("--target", default="host", show_default=True, help="Target preset name or preset YAML path.")
@click.option("--plan", default=None, help="Bit plan JSON or uniform:B (default: uniform:4).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Bundle directory to write.")
@click.option("--data", default=None, type=click.Path(dir_okay=False),
              help="Calibration text: profile routing into the bundle.")
@click.option("--max-tokens", type=int, default=16384, show_default=True, help="Calibration tokens to use.")
@click.option("--group-size", default=64, show_default=True, help="Quantization group size (uniform plans).")
@click.option("--method", default="mse", show_default=True, help="Quantizer for uniform plans: rtn, mse, hqq.")
@click.option("--debug-dump", type=click.Path(file_okay=False), default=None,
              help="Write the IR after each lowering phase into this directory.")
@click.option("--activations", type=click.Choice(["float32", "int8"]), default="float32", show_default=True,
              help="Activations of the quantized decode GEMVs: float32 (exact) or int8 per group "
                   "(faster with int8 dot products, ~1e-2 relative error; like onnxruntime accuracy_level 4).")
def compile_cmd(checkpoint, target, plan, out, data, max_tokens, group_size, method, debug_dump, activations):
    """Compile CHECKPOINT into a bundle for a target (library + packed weights + manifest)."""
    dc = data_config(data, 256, max_tokens, 8) if data else None

    def on_stage(name: str, seconds: float) -> None:
        click.echo(f"  ✓ {name:<24} {seconds:6.1f} s")

    path = api.compile_bundle(api.CompileConfig(checkpoint, out, target, plan, dc, group_size, method, debug_dump,
                                                     activations),
                              on_stage=on_stage)
    click.echo(f"bundle written to {path}")
