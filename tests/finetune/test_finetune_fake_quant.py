"""The trainable fake quantizer: step 0 equals moec's PTQ numerics; LSQ gradients; stored parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moec.finetune.fake_quant import GroupQuant
from moec.quant.quantize import dequantize, quantize, quantize_with


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("method", ["rtn", "mse"])
def test_initial_fake_quant_is_ptq_bit_for_bit(bits, method):
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(bits)) * 0.05
    gq = GroupQuant(w, bits, 16, method)
    ref = dequantize(quantize(w.numpy(), bits, 16, method=method))
    assert np.array_equal(gq(w).detach().numpy(), ref)


def test_exported_parameters_reproduce_the_forward_exactly():
    torch.manual_seed(0)
    w = torch.randn(8, 32) * 0.05
    gq = GroupQuant(w, 3, 8, "rtn")
    with torch.no_grad():  # move the parameters off their initial grid
        gq.log_scale.add_(torch.randn_like(gq.log_scale) * 0.3)
        gq.zero.add_(torch.randn_like(gq.zero))
    w2 = w + torch.randn_like(w) * 0.01
    scale, zero = gq.export()
    qt = quantize_with(w2.numpy(), 3, 8, scale, zero)
    assert np.array_equal(qt.q, gq.codes(w2))
    assert np.array_equal(dequantize(qt), gq(w2).detach().numpy())


def test_scale_gets_the_lsq_gradient_and_clamped_weights_none():
    w = torch.tensor([[0.10, -0.23, 0.31, 5.0, -0.02, 0.07, 0.0, -0.4]])
    gq = GroupQuant(w, 2, 8, "rtn")
    with torch.no_grad():
        gq.log_scale.fill_(float(np.log(0.25)))
        gq.zero.fill_(2.0)
    w = w.clone().requires_grad_(True)
    gq(w).sum().backward()
    s, z, maxq = 0.25, 2.0, 3
    x = w.detach() / s
    q = torch.round(x) + z
    inside = (q >= 0) & (q <= maxq)
    lsq = torch.where(inside, torch.round(x) - x, q.clamp(0, maxq) - z).sum()
    # d/d log_s = s * d/ds
    assert torch.allclose(gq.log_scale.grad, s * lsq.reshape(1, 1), atol=1e-6)
    assert torch.equal(w.grad, inside.float())
    assert gq.zero.grad.item() == pytest.approx(-s * float((~inside).sum()))


def test_frequency_weighted_sampling_shifts_busy_experts_less_and_upwards():
    from moec.core.errors import MoecError
    from moec.core.plan import BitPlan
    from moec.finetune.bit_sampler import BitSampler
    plan = BitPlan({0: {0: 3, 1: 3, 2: 16}}, model_fingerprint="0" * 16)
    freq = {0: [0.0, 1.5, 0.5]}
    counts = {e: {2: 0, 3: 0, 4: 0} for e in (0, 1)}
    s = BitSampler(plan, "neighbours", 0.5, frequency=freq, seed=1)
    for _ in range(4000):
        row = s.sample()[0]
        assert row[2] == 16  # float experts never move
        for e in (0, 1):
            counts[e][row[e]] += 1
    shifted = {e: (counts[e][2] + counts[e][4]) / 4000 for e in (0, 1)}
    assert abs(shifted[0] - 0.5) < 0.04 and abs(shifted[1] - 0.25) < 0.04  # shift_prob * (1 - w / 2)
    assert abs(counts[0][2] - counts[0][4]) < 200  # unused expert: down and up alike
    assert counts[1][2] == 0  # busiest (w = 1): shifted only up
    alls = BitSampler(plan, "all", frequency=freq, seed=2)
    draws = [alls.sample()[0] for _ in range(3000)]
    assert sum(r[1] for r in draws) / 3000 > sum(r[0] for r in draws) / 3000 + 0.5  # tilted to wider
    with pytest.raises(MoecError, match="do not cover layer 0's 3 experts"):
        BitSampler(plan, "neighbours", frequency={0: [1.0]})


def test_plan_prob_mixes_the_plan_with_whole_shifted_plans():
    from moec.core.errors import MoecError
    from moec.core.plan import BitPlan
    from moec.finetune.bit_sampler import BitSampler
    plan = BitPlan({0: {0: 3, 1: 4, 2: 8}, 1: {0: 2, 1: 3, 2: 4}}, model_fingerprint="0" * 16)
    s = BitSampler(plan, "neighbours", 1.0, seed=3, plan_prob=0.25)
    draws = [s.sample() for _ in range(2000)]
    unchanged = sum(d == plan.experts for d in draws) / 2000
    assert abs(unchanged - 0.25) < 0.03  # the rest move every expert (2 -> 3, 8 -> 4, others down or up)
    assert all(d == plan.experts or all(d[l][e] != b for l, ex in plan.experts.items() for e, b in ex.items())
               for d in draws)
    with pytest.raises(MoecError, match="plan probability"):
        BitSampler(plan, "neighbours", plan_prob=1.5)
