"""`moec eval`: perplexity and next-token top-1 accuracy of a checkpoint (optionally under a plan)."""

from __future__ import annotations

import click

from moec import api
from moec.cli.common import data_config, data_options, echo_json, max_memory_option
from moec.cli.table import format_table
from moec.core.formats import SCALE_FORMATS
from moec.core.plan import UNIFORM_METHOD


@click.command("eval")
@click.argument("checkpoint", type=click.Path())
@data_options
@click.option("--plan", default=None,
              help="Bit plan JSON or uniform:B: evaluate the model fake-quantized to this plan.")
@click.option("--group-size", type=click.IntRange(1, 1 << 16), default=64, show_default=True,
              help="Group size for uniform:B plans.")
@click.option("--method", type=click.Choice(["rtn", "mse", "hqq"]), default=UNIFORM_METHOD, show_default=True,
              help="Quantizer for uniform:B plans (the same default as compile and export).")
@click.option("--scales", type=click.Choice(sorted(SCALE_FORMATS)), default=None,
              help="Scale format of the plan's quantized weights: fp16 (one float16 scale per group) or u8 "
                   "(double-quantized: a uint8 code per group times a float16 super-scale per 8 groups; "
                   "with --group-size 32, 4.44 bits per 4-bit weight). Overrides a plan file's. [fp16]")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@max_memory_option
def eval_cmd(checkpoint, data, seq_len, max_tokens, batch, plan, group_size, method, scales, as_json, max_memory_gb):
    """Perplexity and next-token top-1 accuracy on a text file (moec's accuracy metric)."""
    ev = api.evaluate(checkpoint, data_config(data, seq_len, max_tokens, batch, max_memory_gb), plan=plan,
                      progress=not as_json, group_size=group_size, method=method, scales=scales)
    res, mem = ev.result, ev.memory
    if as_json:
        d = res.to_dict()
        d["weight_bytes"] = mem.total if mem else ev.float32_bytes
        if ev.plan is not None:
            d["average_expert_bits"] = ev.plan.average_expert_bits(None)
            d["memory"] = mem.rows
        echo_json(d)
        return
    if mem is not None:
        click.echo(format_table(*mem.table()))
        click.echo(f"\naverage expert bits {ev.plan.average_expert_bits(None):.2f}; "
                   f"{mem.total:,} bytes ({mem.megabytes:.3f} MB) vs float32 {ev.float32_bytes / 1e6:.3f} MB\n")
    else:
        click.echo(f"weights     {ev.float32_bytes / 1e6:.3f} MB (float32)")
    click.echo(f"tokens      {res.tokens}\nperplexity  {res.perplexity:.3f}\ntop-1       {res.top1:.4f}")
