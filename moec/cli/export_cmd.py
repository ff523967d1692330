"""`moec export`: write prefill/decode ONNX graphs of a checkpoint with per-expert bit-widths."""

from __future__ import annotations

import click

from moec import api
from moec.cli.common import max_memory_option
from moec.cli.table import echo_json
from moec.core.formats import SCALE_FORMATS
from moec.core.plan import UNIFORM_METHOD


@click.command("export")
@click.argument("checkpoint", type=click.Path())
@click.option("--plan", required=True, help="Bit plan JSON file, or uniform:<bits>.")
@click.option("--out", required=True, type=click.Path(), help="Output directory (replaced atomically).")
@click.option("--group-size", default=64, show_default=True, help="Group size for uniform:<bits> plans.")
@click.option("--method", default=UNIFORM_METHOD, show_default=True, help="Quantizer for uniform:<bits> plans.")
@click.option("--accuracy-level", type=click.IntRange(0, 4), default=0, show_default=True,
              help="MatMulNBits accuracy_level: 0 = float32 compute (exact), 4 = int8 activations (faster on CPU).")
@click.option("--verify", is_flag=True,
              help="Run a prompt in onnxruntime and compare with the fake-quantized torch model.")
@click.option("--scales", type=click.Choice(sorted(SCALE_FORMATS)), default=None,
              help="Scale format of the plan's quantized weights: fp16 (one float16 scale per group) or u8 "
                   "(double-quantized: a uint8 code per group times a float16 super-scale per 8 groups; "
                   "with --group-size 32, 4.44 bits per 4-bit weight). Overrides a plan file's. u8 is written as dequantized float32 scales (a larger file). [fp16]")
@click.option("--json", "as_json", is_flag=True, help="Print the export summary as JSON.")
@max_memory_option
def export_cmd(checkpoint, plan, out, group_size, method, accuracy_level, verify, scales, as_json, max_memory_gb):
    """Export CHECKPOINT to ONNX (prefill.onnx + decode.onnx) that runs in stock onnxruntime.

    Experts use MatMulNBits (2/4/8 bits), packed bytes unpacked in-graph (3/5/6 bits) or
    float16 (16); a decode step runs only the routed experts.
    """
    res = api.export_onnx(checkpoint, plan, out, group_size=group_size, method=method, verify=verify,
                          accuracy_level=accuracy_level, max_memory_gb=max_memory_gb, scales=scales)
    s = res.summary
    if as_json:
        echo_json({**{k: s[k] for k in ("average_expert_bits", "experts_per_bits", "forms", "bytes")},
                   "out": str(res.out_dir), "files": res.files, "max_abs_diff": res.max_abs_diff})
        return
    click.echo(f"exported to {res.out_dir}")
    for name, size in res.files.items():
        click.echo(f"  {name:<16} {size / 1e6:10.3f} MB")
    per_bits = ", ".join(f"{b}-bit {n}" for b, n in s["experts_per_bits"].items())
    click.echo(f"average expert bits {s['average_expert_bits']:.3f} ({per_bits}); forms: "
               + ", ".join(f"{b}-bit {f}" for b, f in s["forms"].items()))
    if res.max_abs_diff is not None:
        click.echo(f"verify: max |logit difference| vs fake-quantized torch = {res.max_abs_diff:.3g}")
