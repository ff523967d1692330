"""Policies: ILP is exact (brute force), RL reaches the ILP optimum on additive cost and beats ILP's plan
where latency is not additive (bit-class launch overhead), with and without hardware in the loop."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moec.core.errors import MoecError
from moec.search.cost import CostConfig, CostFunction
from moec.search.driver import SearchOptions, run_search
from moec.search.estimator import AnalyticEstimator, PlanMeasurement
from moec.search.policies import get_policy
from moec.search.policies.ilp import solve_additive
from tests.search.problems import synthetic_problem

ADDITIVE = AnalyticEstimator(kernel_overhead_s=0.0)


def brute_force(problem, cost) -> float:
    best = float("inf")
    for a in itertools.product(range(problem.m), repeat=problem.n):
        best = min(best, cost(np.array(a)))
    return best


@pytest.mark.parametrize("seed, frac", [(0, 0.2), (1, 0.45), (2, 0.7), (3, 0.05)])
def test_ilp_is_optimal_by_brute_force(seed, frac):
    p = synthetic_problem(1, 6, seed=seed, budget_frac=frac, bits=(2, 4, 8, 16))
    cost = CostFunction(p, CostConfig(1.0, 0.3, 0.1, "frequency"), ADDITIVE)
    res = run_search(p, cost.config, ADDITIVE, SearchOptions(policy="ilp"))
    assert res.cost.feasible
    assert res.cost.total == pytest.approx(brute_force(p, cost), rel=1e-9)


def test_solve_additive_respects_capacity():
    coef = -np.arange(12, dtype=float).reshape(4, 3)  # prefers the biggest choice everywhere
    nbytes = np.tile([1, 2, 4], (4, 1))
    a = solve_additive(coef, nbytes, 9)
    assert nbytes[np.arange(4), a].sum() <= 9


@pytest.mark.parametrize("seed", [0, 1])
def test_rl_within_one_percent_of_ilp_on_additive_cost(seed):
    p = synthetic_problem(4, 8, seed=seed, budget_frac=0.35)
    cfg = CostConfig(1.0, 0.3, 0.1, "none")
    ilp = run_search(p, cfg, ADDITIVE, SearchOptions(policy="ilp"))
    rl = run_search(p, cfg, ADDITIVE, SearchOptions(policy="rl", episodes=120, seed=seed))
    assert rl.cost.feasible
    assert rl.cost.total <= ilp.cost.total * 1.01
    # and greedy / uniform, which ignore the cost's latency terms, are no better than the optimum
    for name in ("greedy", "uniform"):
        other = run_search(p, cfg, ADDITIVE, SearchOptions(policy=name))
        assert other.cost.feasible and other.cost.total >= ilp.cost.total - 1e-12


def test_rl_beats_ilp_when_bit_classes_cost_launches():
    """Each (layer, bit class) kernel costs 2 us: the ILP optimises the additive stand-in, RL the real cost."""
    p = synthetic_problem(4, 8, seed=0, budget_frac=0.35)
    est = AnalyticEstimator(kernel_overhead_s=2e-6)
    cfg = CostConfig(1.0, 1.0, 0.0, "none")
    ilp = run_search(p, cfg, est, SearchOptions(policy="ilp"))
    rl = run_search(p, cfg, est, SearchOptions(policy="rl", episodes=120, seed=0))
    assert rl.cost.total < ilp.cost.total * 0.95
    classes = lambda r: len({(l, b) for (l, _), b in zip(p.items, p.bits_of(r.assign))})  # noqa: E731
    assert classes(rl) < classes(ilp)  # it found plans with fewer bit classes per layer


class GroupingDevice:
    """Deterministic test double of a device: bandwidth plus 8 us per launched (layer, bit class)."""

    def __init__(self, problem):
        self.p, self.calls = problem, 0
        self.model = AnalyticEstimator(kernel_overhead_s=8e-6)

    def latency(self, assign):
        return self.model.estimate(self.p, assign).latency_s

    def __call__(self, plan):
        self.calls += 1
        return PlanMeasurement(self.latency(self.p.from_plan(plan)), None)


def test_hardware_in_the_loop_corrects_the_model_and_beats_ilp_on_measured_cost():
    p = synthetic_problem(4, 8, seed=1, budget_frac=0.35)
    cfg = CostConfig(1.0, 1.0, 0.0, "none")
    device = GroupingDevice(p)
    naive = AnalyticEstimator(kernel_overhead_s=0.0)  # believes launches are free: additive
    ilp = run_search(p, cfg, naive, SearchOptions(policy="ilp"))
    blind = run_search(p, cfg, naive, SearchOptions(policy="rl", episodes=120, seed=1))
    hil = run_search(p, cfg, naive, SearchOptions(policy="rl", episodes=120, seed=1, measurer=device,
                                                  measure_every=10))
    assert device.calls >= 3 and len(hil.measured) == device.calls
    assert "corrected" in hil.cost.label
    # the search's objective (its normalisation) with the device's latency in place of the model's
    true_cost = CostFunction(p, cfg, device.model, refs=CostFunction(p, cfg, naive).refs)
    assert true_cost(blind.assign) == pytest.approx(true_cost(ilp.assign), rel=0.01)  # same model, same optimum
    assert true_cost(hil.assign) < true_cost(ilp.assign) * 0.95  # measurements taught it the launch cost
    assert hil.plan.provenance["device_measurements"] == device.calls


def test_errors():
    with pytest.raises(MoecError, match="unknown policy 'ppo'; choices: uniform, greedy, ilp, rl"):
        get_policy("ppo")
    p = synthetic_problem(1, 4, seed=0)
    p.budget_bytes = p.fixed_bytes
    with pytest.raises(MoecError, match="below the smallest plan"):
        run_search(p, CostConfig(), ADDITIVE, SearchOptions(policy="ilp"))
