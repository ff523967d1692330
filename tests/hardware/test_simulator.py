"""Latency simulator composition, fitting and persistence (synthetic tables; no device)."""

from __future__ import annotations

import numpy as np
import pytest

from moec.core.errors import MoecError
from moec.hardware.simulator import LatencySimulator, calibration_plans, routed_count_dist
from moec.core.config import MoEConfig
from moec.core.plan import uniform_plan

CFG = MoEConfig(vocab_size=96, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4, top_k=2,
                expert_intermediate=32)
BITS = (2, 4, 8)


def _sim(t_expert=lambda b, m: 1e-7 + 1e-6 * b * m, t_dense=lambda b: 1e-6 * b) -> LatencySimulator:
    sim = LatencySimulator("host", "host", CFG.fingerprint(), 32, CFG.top_k, base_s=1e-4, per_class_s=2e-5)
    for b in BITS:
        for n, k, pe in [(32, 64, 0), (64, 32, 1)]:
            sim.expert_s[f"{b},{n},{k},{pe}"] = [t_expert(b, m) for m in (0, 1, 2)]
    for b in BITS + (16,):
        for n, k in [(64, 64), (32, 64), (96, 64)]:
            sim.dense_s[f"{b},{n},{k}"] = t_dense(b)
        sim.unsupported.append(f"{b},4,64")  # the router runs on reference code
    return sim


def test_routed_count_distribution():
    np.testing.assert_allclose(routed_count_dist([0.5, 0.5], 2), [0.25, 0.5, 0.25])
    np.testing.assert_allclose(routed_count_dist([1, 1, 1], 2), [0, 0, 1])  # capped at top_k
    np.testing.assert_allclose(routed_count_dist([], 2), [1, 0, 0])


def test_unrouted_class_costs_only_its_calls():
    sim = _sim()
    plan = uniform_plan(CFG, 4, 32)
    plan.experts = {l: {0: 2, 1: 2, 2: 8, 3: 8} for l in CFG.moe_layers}
    only_2bit = np.array([[0.9, 0.9, 0, 0], [0.9, 0.9, 0, 0]])
    parts = sim.breakdown(CFG, plan, only_2bit)
    # 8-bit class: nobody routed -> rows guarded off, each of its 3 calls costs t(m=0) only
    p = routed_count_dist([0.9, 0.9], 2)
    two_bit = 3 * (p[0] * 1e-7 + p[1] * (1e-7 + 2e-6) + p[2] * (1e-7 + 4e-6))
    assert parts["experts"] == pytest.approx(2 * (two_bit + 3 * 1e-7))
    assert parts["classes"] == 4 and parts["dispatch"] == pytest.approx(4 * 2e-5)
    assert parts["total"] == pytest.approx(parts["base"] + parts["dense"] + parts["experts"] + parts["dispatch"])


def test_fewer_bits_and_fewer_classes_predict_faster():
    sim = _sim()
    freq = np.full((2, 4), 0.5)
    t2, t8 = (sim.predict(CFG, uniform_plan(CFG, b, 32), freq) for b in (2, 8))
    assert t2 < t8
    mixed = uniform_plan(CFG, 2, 32)
    mixed.experts = {l: {e: (2, 4, 8, 2)[e] for e in range(4)} for l in CFG.moe_layers}
    assert sim.predict(CFG, mixed, freq) > t2  # more classes: more dispatch and more expert reads


def test_fit_recovers_overheads():
    truth = _sim()
    rng = np.random.default_rng(0)
    rows = []
    for plan in calibration_plans(CFG, BITS, 32, "rtn"):
        f = rng.uniform(0.2, 0.8, (2, 4))
        rows.append((plan, f, truth.predict(CFG, plan, f)))
    sim = _sim()
    sim.base_s = sim.per_class_s = 0.0
    sim.fit_overheads(CFG, rows)
    assert sim.base_s == pytest.approx(1e-4) and sim.per_class_s == pytest.approx(2e-5)


def test_save_load_round_trip(tmp_path):
    sim = _sim()
    sim.save(tmp_path / "sim.json")
    back = LatencySimulator.load(tmp_path / "sim.json")
    plan, f = uniform_plan(CFG, 4, 32), np.full((2, 4), 0.5)
    assert back.predict(CFG, plan, f) == sim.predict(CFG, plan, f)
    (tmp_path / "bad.json").write_text('{"version": 2, "nonsense": 3}')
    with pytest.raises(MoecError, match="malformed"):
        LatencySimulator.load(tmp_path / "bad.json")


def test_bad_inputs_are_moec_errors():
    sim = _sim()
    with pytest.raises(MoecError, match="shape"):
        sim.predict(CFG, uniform_plan(CFG, 4, 32), np.zeros((3, 4)))
    with pytest.raises(MoecError, match="3-bit experts"):
        sim.predict(CFG, uniform_plan(CFG, 3, 32), None)
    with pytest.raises(MoecError, match="group size"):
        sim.predict(CFG, uniform_plan(CFG, 4, 64), None)
    other = MoEConfig(**{**CFG.to_dict(), "num_layers": 3})
    with pytest.raises(MoecError, match="calibrated for model"):
        sim.predict(other, uniform_plan(other, 4, 32), None)


def test_energy_is_labelled():
    sim = _sim()
    plan = uniform_plan(CFG, 4, 32)
    j, source = sim.energy(CFG, plan, None)
    assert source == "modelled" and j > 0
    sim.watts = 10.0
    j, source = sim.energy(CFG, plan, None)
    assert source == "measured" and j == pytest.approx(10.0 * sim.predict(CFG, plan, None))


@pytest.mark.tvm
def test_plan_kernel_set():
    from moec.hardware.kernel_classes import plan_kernel_candidates
    plan = uniform_plan(CFG, 4, 32)
    plan.experts = {0: {0: 2, 1: 2, 2: 4, 3: 4}, 1: {0: 4, 1: 4, 2: 4, 3: 4}}
    kernels = plan_kernel_candidates(CFG, plan)
    expert = {(k.bits, k.n, k.k, k.per_expert, k.routed) for k in kernels if k.stacked == 4}
    assert expert == {(b, n, k, pe, m) for b in (2, 4) for n, k, pe in [(32, 64, False), (64, 32, True)]
                      for m in (0, 1, 2)}
    assert all(k.bits == 4 for k in kernels if k.stacked == 1)  # attention / lm_head at 4 bits
