"""Tampered RL search states end in one clean line (never an assert or an internal error)."""

from __future__ import annotations

import json

import pytest

from moec.core.errors import MoecError
from moec.search.cost import CostConfig
from moec.search.driver import SearchOptions, run_search
from moec.search.estimator import AnalyticEstimator
from tests.search.problems import synthetic_problem


def _edit_best_over_budget(s, p):
    s["best"] = [p.m - 1] * p.n  # the widest choice everywhere: over any budget
    s["best_cost"] = -1e9


TAMPERS = {
    "negative episode": (lambda s, p: s.update(episode=-5), "episode"),
    "episode beyond the search": (lambda s, p: s.update(episode=10**9), "beyond"),
    "bool episode": (lambda s, p: s.update(episode=True), "episode"),
    "W of the wrong shape": (lambda s, p: s.update(W=[[1.0]]), "shape"),
    "W with NaN": (lambda s, p: s["W"][0].__setitem__(0, float("nan")), "finite"),
    "best out of range": (lambda s, p: s.update(best=[99] * p.n, best_cost=0.0), "assignment"),
    "best too short": (lambda s, p: s.update(best=[0], best_cost=0.0), "assignment"),
    "rng garbage": (lambda s, p: s.update(rng="x"), "malformed"),
    "missing field": (lambda s, p: s.pop("theta"), "malformed"),
    "refs not a dict": (lambda s, p: s.update(refs=[1, 2, 3]), "malformed"),
    "visited garbage": (lambda s, p: s.update(visited=[[["a"], 1]]), "malformed"),
    "signature not a dict": (lambda s, p: s.update(signature=[]), "different search"),
    "not an object": (None, "not a JSON object"),
}


@pytest.mark.parametrize("name", sorted(TAMPERS))
def test_tampered_state(tmp_path, name):
    p = synthetic_problem()
    state = tmp_path / "s.json"
    opts = SearchOptions(policy="rl", episodes=10, state_path=str(state))
    run_search(p, CostConfig(), AnalyticEstimator(), opts)
    edit, needle = TAMPERS[name]
    if edit is None:
        state.write_text("[1, 2]")
    else:
        s = json.loads(state.read_text())
        edit(s, p)
        state.write_text(json.dumps(s))
    with pytest.raises(MoecError, match=needle):
        run_search(p, CostConfig(), AnalyticEstimator(), SearchOptions(policy="rl", episodes=10,
                                                                       state_path=str(state)))


def test_over_budget_best_is_a_clean_error(tmp_path):
    p = synthetic_problem()
    state = tmp_path / "s.json"
    run_search(p, CostConfig(), AnalyticEstimator(), SearchOptions(policy="rl", episodes=10, state_path=str(state)))
    s = json.loads(state.read_text())
    _edit_best_over_budget(s, p)
    state.write_text(json.dumps(s))
    with pytest.raises(MoecError, match="over the budget"):
        run_search(p, CostConfig(), AnalyticEstimator(), SearchOptions(policy="rl", episodes=10,
                                                                       state_path=str(state)))
