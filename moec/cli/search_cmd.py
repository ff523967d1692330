"""`moec search`: a per-expert bit plan under a memory budget (policy, cost weights, plots, resumable state)."""

from __future__ import annotations

import click

from moec.cli.common import data_config
from moec.cli.table import format_table
from moec.core.errors import MoecError
from moec.search.cost import DEFAULT_WEIGHTING, WEIGHTINGS
from moec.pipeline.search import ESTIMATORS, MEASURES, SearchConfig, search
from moec.search.policies import POLICIES
from moec.search.problem import DEFAULT_TENSORS, SEARCH_KNOBS


def parse_tensor_bits(spec: str | None) -> dict[str, int] | None:
    """``attention=8,embeddings=4`` → {key: bits} (``router=16`` kept unless given)."""
    if not spec:
        return None
    out = {"router": 16}
    for part in spec.split(","):
        key, sep, val = part.partition("=")
        if not sep or not val.strip().isdigit():
            raise MoecError(f"bad --tensor-bits entry '{part}'; expected KEY=BITS (e.g. attention=8,re:.*=4)")
        out[key.strip()] = int(val)
    return out


def search_options(f):
    """Options shared by `moec search` and `moec compile` (search part)."""
    opts = [
        click.option("--budget-mb", type=float, default=None,
                     help="Weight memory budget in MB (default: 60% of the uniform INT8 plan)."),
        click.option("--policy", type=click.Choice(list(POLICIES)), default=None, help="Search policy [default: rl]."),
        click.option("--alpha", type=float, default=None, help="Weight of the accuracy-loss term [1.0]."),
        click.option("--beta", type=float, default=None, help="Weight of the latency term [0.5]."),
        click.option("--gamma", type=float, default=None, help="Weight of the energy term [0.05]."),
        click.option("--weighting", type=click.Choice(list(WEIGHTINGS)), default=None,
                     help=f"Per-expert loss weights w_e [default: {DEFAULT_WEIGHTING}]."),
        click.option("--profile", "profile_path", type=click.Path(dir_okay=False), default=None,
                     help="Profile JSON with sensitivity (from `moec profile --sensitivity ...`)."),
        click.option("--episodes", type=int, default=None, help="RL episodes [300]."),
        click.option("--seed", type=int, default=None, help="Random seed [0]."),
        click.option("--tensor-bits", default=None, help="Non-expert bits, e.g. 're:.*=8' "
                     f"[{','.join(f'{k}={v}' for k, v in DEFAULT_TENSORS.items())}]."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


@click.command("search")
@click.argument("checkpoint", type=click.Path())
@click.option("--target", default="host", show_default=True, help="Target preset name or YAML path.")
@search_options
@click.option("--group-size", type=click.IntRange(1, 1 << 16), default=64, show_default=True,
              help="Quantization group size (must divide every quantized weight's input width).")
@click.option("--data", default=None, type=click.Path(dir_okay=False),
              help="Calibration text: profile (proxy sensitivity) when no --profile is given.")
@click.option("--max-tokens", type=int, default=16384, show_default=True, help="Calibration tokens with --data.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Write the plan JSON here.")
@click.option("--state", type=click.Path(dir_okay=False), default=None,
              help="Search state file: checkpointed during the search; an existing one is resumed.")
@click.option("--plot-dir", type=click.Path(file_okay=False), default=None,
              help="Write pareto.png and bits_vs_frequency.png here.")
@click.option("--estimator", type=click.Choice(ESTIMATORS), default="analytic", show_default=True,
              help="Latency source: analytic model (modelled) or the farm's simulator (simulated).")
@click.option("--simulator", type=click.Path(dir_okay=False), default=None, help="Calibrated simulator file.")
@click.option("--measure", type=click.Choice(MEASURES), default="none", show_default=True,
              help="Hardware in the loop: time the best plan every --measure-every episodes.")
@click.option("--measure-every", type=int, default=50, show_default=True, help="Episodes between measurements.")
@click.option("--tracker", default=None, help="Device-farm tracker HOST:PORT for --measure farm.")
@click.option("--knobs", type=click.Choice(list(SEARCH_KNOBS)), multiple=True,
              help="Architecture knobs the search also chooses: 'drop' lets it drop an expert (0 bytes, written to "
                   "the plan's dropped_experts; the profile needs --bits 0,...; --policy ilp).")
def search_cmd(checkpoint, target, budget_mb, policy, alpha, beta, gamma, weighting, profile_path, episodes, seed,
               tensor_bits, data, max_tokens, out, state, plot_dir, estimator, simulator, measure, measure_every,
               tracker, group_size, knobs):
    """Search a bit-width per expert of CHECKPOINT under a memory budget and write the plan."""
    cfg = SearchConfig(checkpoint, target, budget_mb, profile_path, data_config(data, 256, max_tokens, 8) if data
                       else None, state=state, plot_dir=plot_dir, estimator=estimator, simulator=simulator,
                       measure=measure, measure_every=measure_every, tracker=tracker, knobs=tuple(knobs))
    for name, val in (("policy", policy), ("alpha", alpha), ("beta", beta), ("gamma", gamma),
                      ("weighting", weighting), ("episodes", episodes), ("seed", seed),
                      ("tensor_bits", parse_tensor_bits(tensor_bits)), ("group_size", group_size)):
        if val is not None:
            setattr(cfg, name, val)
    outcome = search(cfg)
    res, prob = outcome.result, outcome.problem
    res.plan.save(out)
    counts = {b: int((prob.bits_of(res.assign) == b).sum()) for b in prob.bits}
    by_bits = ", ".join(f"{b}-bit: {c}" if b else f"dropped: {c}" for b, c in counts.items() if c)
    rows = [["policy", cfg.policy], ["experts by bits", by_bits],
            ["weight memory", f"{res.cost.memory_bytes / 1e6:.3f} MB (budget {prob.budget_bytes / 1e6:.3f} MB)"],
            [f"accuracy loss ({prob.loss_source})", f"{res.cost.accuracy:.5f}"],
            [f"latency ({res.cost.label})", f"{res.cost.latency_s * 1e3:.4f} ms/step"],
            [f"energy ({res.cost.label})", f"{res.cost.energy_j * 1e3:.4f} mJ/step"],
            ["cost", f"{res.cost.total:.5f}"], ["plans evaluated", str(res.evaluations)],
            ["device measurements", str(len(res.measured))]]
    click.echo(format_table(["search", "result"], rows, align="ll"))
    for p in outcome.plots:
        click.echo(f"plot written to {p}")
    click.echo(f"plan written to {out}")
