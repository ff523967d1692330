"""`moec eval`: perplexity and next-token top-1 accuracy of a checkpoint (optionally under a plan) or of a
compiled bundle (its own kernels)."""

from __future__ import annotations

import click

from moec import api
from moec.cli.common import data_config, data_options, max_memory_option
from moec.cli.table import echo_json, format_table
from moec.core.errors import MoecError
from moec.core.formats import SCALE_FORMATS
from moec.core.plan import UNIFORM_METHOD


@click.command("eval")
@click.argument("checkpoint", metavar="CHECKPOINT|BUNDLE", type=click.Path())
@data_options
@click.option("--plan", default=None,
              help="Bit plan JSON or uniform:B: evaluate the model fake-quantized to this plan (a checkpoint), "
                   "or serve this run-time plan (a nested bundle).")
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
    """Perplexity and next-token top-1 accuracy on a text file (moec's accuracy metric).

    CHECKPOINT: the model in float32, or fake-quantized to --plan. BUNDLE (a `moec compile` output): the
    bundle's own decode kernels on this machine (int8 activations, nested widths, the target's
    arithmetic), each window teacher-forced through its decode step; --batch does not apply.
    """
    if api.is_bundle(checkpoint):
        _eval_bundle(checkpoint, data_config(data, seq_len, max_tokens, batch, max_memory_gb), plan, as_json,
                     quantizer_options(click.get_current_context()))
        return
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
    _echo_scores(res)


def quantizer_options(ctx: click.Context) -> list[str]:
    """The checkpoint-only quantizer options the user gave."""
    given = [("group_size", "--group-size"), ("method", "--method"), ("scales", "--scales")]
    return [flag for name, flag in given
            if ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)]


def _eval_bundle(bundle, data, plan, as_json, quantizer) -> None:
    if quantizer:
        raise MoecError(f"{', '.join(quantizer)} quantize a checkpoint; a bundle's weights are already quantized")
    ev = api.evaluate_bundle(bundle, data, plan=plan, progress=not as_json)
    res = ev.result
    if as_json:
        d = res.to_dict()
        d.update(bundle_bytes=ev.file_bytes, activations=ev.activations, plan=ev.plan)
        echo_json(d)
        return
    served = f"; run-time plan {ev.plan}" if ev.plan else ""
    click.echo(f"bundle      {ev.file_bytes / 1e6:.3f} MB (all files); {ev.activations} activations{served}")
    _echo_scores(res)


def _echo_scores(res) -> None:
    click.echo(f"tokens      {res.tokens}\nperplexity  {res.perplexity:.3f}\ntop-1       {res.top1:.4f}")
