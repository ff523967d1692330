"""`moec profile`: routing statistics of a checkpoint on calibration text."""

from __future__ import annotations

import click

from moec import api
from moec.cli.common import data_config, data_options, max_memory_option
from moec.cli.table import format_table


@click.command("profile")
@click.argument("checkpoint", type=click.Path())
@data_options
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write statistics as JSON here.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Write a layer × expert heatmap PNG.")
@click.option("--sensitivity", type=click.Choice(["none", "proxy", "exact", "both"]), default="none",
              show_default=True, help="Also measure AccuracyLoss(expert, bits): proxy = gate-weighted output "
              "distortion on calibration tokens, exact = held-out loss increase.")
@click.option("--heldout", type=click.Path(dir_okay=False), default=None,
              help="Text for the exact sensitivity (default: the calibration data).")
@click.option("--heldout-tokens", type=int, default=8192, show_default=True, help="Tokens of --heldout to use.")
@click.option("--bits", default="2,3,4,8", show_default=True, help="Bit-widths to measure sensitivity at; 0 measures dropping the expert (masked from the router), "
              "which `moec search --knobs drop` needs.")
@click.option("--group-size", default=64, show_default=True, help="Quantization group size.")
@click.option("--method", default="rtn", show_default=True, help="Quantizer: rtn, mse or hqq.")
@max_memory_option
def profile_cmd(checkpoint, data, seq_len, max_tokens, batch, out, plot, sensitivity, heldout, heldout_tokens,
                bits, group_size, method, max_memory_gb):
    """Measure each expert's activation frequency, gate mass and output contribution.

    Calibration text runs through the model with its real routing (tokens are never
    forced to experts). Experts that no token reaches are kept and marked.
    """
    try:
        bit_list = tuple(int(b) for b in bits.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got '{bits}'", param_hint="--bits") from None
    held = data_config(heldout, seq_len, heldout_tokens, batch) if heldout else None
    sens = api.SensitivityConfig(sensitivity, bit_list, group_size, method, held)
    stats = api.profile(checkpoint, data_config(data, seq_len, max_tokens, batch, max_memory_gb), out=out, plot=plot,
                        sensitivity=sens)
    click.echo(f"{stats.tokens} calibration tokens, {stats.num_experts} experts, top-{stats.top_k}\n")
    for layer in sorted(stats.layers):
        freq, gate, contrib = stats.frequency(layer), stats.gate_share(layer), stats.contribution(layer)
        rows = [[e, float(freq[e]), float(gate[e]), float(contrib[e]), "never" if freq[e] == 0 else ""]
                for e in range(stats.num_experts)]
        sp = stats.spread(layer)
        click.echo(f"layer {layer}: frequency max/min {sp['max_over_min']:.2f}, cv {sp['cv']:.2f}, "
                   f"normalised entropy {sp['entropy']:.3f}")
        click.echo(format_table(["expert", "frequency", "gate share", "contribution", "activated"], rows,
                                align="rrrrl"))
        click.echo("")
    never = stats.never_activated()
    if never:
        click.echo(f"{len(never)} expert(s) never activated: {never}")
    if stats.sensitivity:
        _echo_sensitivity(stats.sensitivity)
    if out:
        click.echo(f"statistics written to {out}")
    if plot:
        click.echo(f"heatmap written to {plot}")


def _echo_sensitivity(sens: dict) -> None:
    bits = sens["bits"]
    for kind in ("proxy", "exact"):
        if not sens.get(kind):
            continue
        click.echo(f"{kind} sensitivity (rows layer.expert, columns bits):")
        rows = [[f"{l}.{e}"] + [float(v) for v in vals]
                for l, per_e in sorted(sens[kind].items(), key=lambda kv: int(kv[0])) for e, vals in enumerate(per_e)]
        click.echo(format_table(["expert"] + [f"{b}-bit" for b in bits], rows, align="l" + "r" * len(bits)))
        click.echo("")
    if sens.get("spearman") is not None:
        click.echo(f"Spearman rank correlation proxy vs exact: {sens['spearman']:.3f}")
