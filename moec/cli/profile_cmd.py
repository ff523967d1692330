"""`moec profile`: routing statistics of a checkpoint on calibration text."""

from __future__ import annotations

import click

from moec import api
from moec.cli.common import data_config, data_options
from moec.cli.table import format_table


@click.command("profile")
@click.argument("checkpoint", type=click.Path())
@data_options
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write statistics as JSON here.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Write a layer × expert heatmap PNG.")
def profile_cmd(checkpoint, data, seq_len, max_tokens, batch, out, plot):
    """Measure each expert's activation frequency, gate mass and output contribution.

    Calibration text runs through the model with its real routing (tokens are never
    forced to experts). Experts that no token reaches are kept and marked.
    """
    stats = api.profile(checkpoint, data_config(data, seq_len, max_tokens, batch), out=out, plot=plot)
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
    if out:
        click.echo(f"statistics written to {out}")
    if plot:
        click.echo(f"heatmap written to {plot}")
