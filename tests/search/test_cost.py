"""Cost terms, weightings, the analytic (modelled) estimator and exact memory accounting of search problems."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moec.core.errors import MoecError
from moec.search.cost import WEIGHTINGS, CostConfig, CostFunction, expert_weights
from moec.search.estimator import AnalyticEstimator, CorrectedEstimator, PlanMeasurement, class_presence
from tests.search.problems import synthetic_problem


def test_weightings_are_normalised_and_ordered():
    p = synthetic_problem(2, 4, seed=1)
    for name in WEIGHTINGS:
        assert expert_weights(p, name).mean() == pytest.approx(1.0)
    f, inv = expert_weights(p, "frequency"), expert_weights(p, "inverse-frequency")
    order = np.argsort(p.frequency)
    assert np.all(np.diff(f[order]) >= 0) and np.all(np.diff(inv[order]) <= 0)
    assert np.allclose(expert_weights(p, "contribution"), p.frequency * p.contribution / (p.frequency * p.contribution).mean())
    with pytest.raises(MoecError, match="unknown weighting 'freq'; choices: frequency, inverse-frequency"):
        CostConfig(weighting="freq")
    with pytest.raises(MoecError, match="beta must be >= 0"):
        CostConfig(beta=-1)


def test_class_presence_is_expected_kernel_count():
    """Exact expectation over independent routing events equals the closed form."""
    p = synthetic_problem(2, 3, seed=2)
    a = np.array([0, 0, 2, 1, 1, 1])
    f = np.clip(p.frequency, 0, 1)
    expect = 0.0
    for routed in itertools.product([0, 1], repeat=p.n):
        prob = np.prod([fi if r else 1 - fi for fi, r in zip(f, routed)])
        classes = {(p.layer_index[i], a[i]) for i in range(p.n) if routed[i]}
        expect += prob * len(classes)
    assert class_presence(p, a) == pytest.approx(expect)


def test_analytic_estimate_parts_and_additivity():
    p = synthetic_problem(2, 4, seed=3)
    est = AnalyticEstimator(bandwidth_gbps=10.0, kernel_overhead_s=0.0)
    add = est.additive(p)
    assert add.exact
    for a in (p.uniform(4), np.array([0, 1, 2, 3, 4, 0, 1, 2])):
        e = est.estimate(p, a)
        rows = np.arange(p.n)
        assert e.latency_s == pytest.approx(add.latency[rows, a].sum() + add.latency_const)
        assert e.energy_j == pytest.approx(add.energy[rows, a].sum() + add.energy_const)
        assert e.label == "modelled"
    assert not AnalyticEstimator(kernel_overhead_s=1e-6).additive(p).exact
    # fewer bits -> fewer bytes -> lower modelled latency and energy
    lo, hi = est.estimate(p, p.uniform(2)), est.estimate(p, p.uniform(8))
    assert lo.latency_s < hi.latency_s and lo.energy_j < hi.energy_j


def test_cost_over_budget_is_infinite_and_terms_add_up():
    p = synthetic_problem(2, 4, seed=4, budget_frac=0.3)
    cost = CostFunction(p, CostConfig(1.0, 0.5, 0.25, "frequency"), AnalyticEstimator(kernel_overhead_s=0))
    assert cost(p.uniform(16)) == float("inf")
    a = p.uniform(2)
    br = cost.evaluate(a)
    r = cost.refs
    assert br.feasible and br.total == pytest.approx(br.accuracy / r["loss"] + 0.5 * br.latency_s / r["latency_s"]
                                                       + 0.25 * br.energy_j / r["energy_j"])
    coef, const, exact = cost.additive()
    assert exact and br.total == pytest.approx(coef[np.arange(p.n), a].sum() + const)


def test_correction_refits_bandwidth_against_launch_overhead():
    """Two or more measurements re-weight the model's parts (not only its scale)."""
    p = synthetic_problem(2, 4, seed=5)
    base = AnalyticEstimator(bandwidth_gbps=10.0, kernel_overhead_s=1e-6)
    corr = CorrectedEstimator(base)

    def truth(a):  # the device: 2x slower memory, 10 us per kernel
        e = base.estimate(p, a)
        return 2 * e.parts["bytes"] + 1e-5 * e.parts["kernel_count"]

    plans = [p.uniform(2), p.uniform(8), np.array([0, 4, 1, 3, 2, 2, 0, 4])]
    corr.add(p, plans[0], PlanMeasurement(truth(plans[0]), None))
    assert corr.estimate(p, plans[0]).latency_s == pytest.approx(truth(plans[0]))  # one: a scale
    for a in plans[1:]:
        corr.add(p, a, PlanMeasurement(truth(a), None))
    probe = np.array([1, 1, 1, 1, 3, 3, 3, 3])
    assert corr.estimate(p, probe).latency_s == pytest.approx(truth(probe), rel=0.05)
    assert corr._coef[1] > 5e-6  # the launch cost moved from the model's 1 us toward the device's 10 us
    assert "corrected(3 measurements)" in corr.label
