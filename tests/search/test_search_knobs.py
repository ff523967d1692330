"""`moec search --knobs drop`: the search may drop an expert (0 bytes, loss from the profile's width-0 column)."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from moec.cli.main import cli
from moec.core.errors import MoecError
from moec.core.plan import resolve_plan
from moec.models.checkpoint import load_checkpoint
from moec.quant.accounting import plan_memory
from moec.search.cost import CostConfig
from moec.search.driver import SearchOptions, run_search
from moec.search.estimator import AnalyticEstimator
from moec.search.problem import SearchProblem

BITS = (0, 2, 4, 8)


def drop_problem(budget_frac: float) -> SearchProblem:
    """2 layers × 4 experts, top-2; expert 3 of each layer is rare (dropping it costs little), expert 0 hot.
    The budget is ``budget_frac`` of the way from all experts at 2 bits to all at 8 (negative: below 2 bits;
    -k: k experts at 2 bits, per layer, over the budget)."""
    items = [(l, e) for l in range(2) for e in range(4)]
    freq = np.array([0.9, 0.6, 0.45, 0.05] * 2)
    size = 3 * 64 * 64
    nbytes = np.array([[0] + [size * b // 8 + size // 32 for b in BITS[1:]]] * 8)
    quant = np.array([2.0 ** (-1.6 * b) * 16 for b in BITS[1:]])
    loss = np.array([[f * 4.0] + list(f * quant) for f in freq])  # drop ∝ routed traffic, above 2-bit's loss
    fixed = 10_000
    lo, hi = nbytes[:, 1].sum(), nbytes[:, -1].sum()
    budget_frac = budget_frac if budget_frac >= 0 else budget_frac * 2 * nbytes[0, 1] / (hi - lo)  # in 2-bit experts
    return SearchProblem(items, BITS, nbytes, loss, freq, np.full(8, 0.5), fixed, int(fixed + lo + budget_frac * (hi - lo)),
                         size, fixed // 2, 20_000, group_size=64, model_fingerprint="synthetic", top_k=2)


def search(problem, policy="ilp"):
    return run_search(problem, CostConfig(weighting="none"), AnalyticEstimator(), SearchOptions(policy=policy))


def test_tight_budget_drops_the_rare_experts_never_a_hot_one():
    res = search(drop_problem(-0.8))  # 0.8 experts at 2 bits per layer over the budget: one per layer must go
    dropped = res.plan.dropped_experts
    assert set(dropped) == {0, 1} and all(3 in ex and 0 not in ex for ex in dropped.values())
    assert res.cost.memory_bytes <= res.plan.provenance["budget_mb"] * 1e6
    assert all(res.plan.experts[l][3] == 2 for l in res.plan.dropped_experts)  # lowest width, not stored


def test_loose_budget_drops_nothing_and_top_k_always_remains():
    assert not search(drop_problem(1.0)).plan.dropped_experts
    p = drop_problem(-2.0)  # as tight as it gets: 2 of 4 dropped per layer, the two rarest
    assert p.min_memory() <= p.budget_bytes
    res = search(p)
    assert {l: sorted(ex) for l, ex in res.plan.dropped_experts.items()} == {0: [2, 3], 1: [2, 3]}
    p.budget_bytes = p.min_memory() - 1
    with pytest.raises(MoecError, match=r"all but top-2 per layer dropped"):
        search(p)


def test_plan_round_trip_and_policies_without_the_constraint_refused():
    p = drop_problem(-0.8)
    res = search(p)
    assert (p.from_plan(res.plan) == res.assign).all()
    with pytest.raises(MoecError, match="ilp policy only"):
        search(p, "greedy")


def run(*args):
    res = CliRunner().invoke(cli, [str(a) for a in args])
    return res.exit_code, res.output


def test_search_cli_drops_rare_experts_of_a_tiny_model(tiny_profiled, tmp_path):
    from moec import api
    from moec.profile.stats import ExpertStats

    ckpt, data, _ = tiny_profiled
    prof = tmp_path / "drop-profile.json"
    api.profile(ckpt, api.DataConfig(data, 64, None, 8), out=prof, progress=False,
                sensitivity=api.SensitivityConfig("proxy", (0, 2, 3, 4, 8), 32, "rtn"))
    model = load_checkpoint(ckpt)
    all2 = plan_memory(model, resolve_plan("uniform:2", model.cfg, 32)).total
    out = tmp_path / "plan.json"
    code, text = run("search", ckpt, "--profile", prof, "--policy", "ilp", "--knobs", "drop", "--group-size", 32,
                     "--budget-mb", all2 * 0.97 / 1e6, "--tensor-bits", "re:.*=2", "--out", out)
    assert code == 0, text
    plan = resolve_plan(out, model.cfg)
    assert plan.dropped_experts and "dropped:" in text
    assert plan_memory(model, plan).total <= all2 * 0.97
    stats = ExpertStats.load(prof)
    for layer, ex in plan.dropped_experts.items():
        f = stats.frequency(layer)
        assert int(np.argmax(f)) not in ex  # never the busiest expert of a layer
    # same budget without the knob: no drop; a profile without width 0 is refused in one line
    code, text = run("search", ckpt, "--profile", tiny_profiled[2], "--policy", "ilp", "--knobs", "drop",
                     "--group-size", 32, "--out", tmp_path / "x.json")
    assert code != 0 and "--bits 0,2,3,4,8" in text and len(text.strip().splitlines()) == 1
