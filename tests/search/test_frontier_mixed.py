"""The frontier benchmark's mixed stage (benchmarks/frontier_mixed.py): per-expert ILP plans fit the byte
budget exactly as ``plan_memory`` counts it, and spend it where the sensitivities say."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import frontier_mixed as fm  # noqa: E402

from moec.models.model import MoEModel  # noqa: E402
from moec.core.config import MoEConfig  # noqa: E402
from moec.quant.accounting import plan_memory  # noqa: E402


def _model() -> MoEModel:
    cfg = MoEConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4,
                    top_k=2, expert_intermediate=64, rms_eps=1e-5)
    return MoEModel(cfg)


def _problem(model):
    cfg = model.cfg
    items = [(l, e) for l in cfg.moe_layers for e in range(cfg.num_experts)]
    m = len(fm.EXPERT_BITS)
    # expert 0 of each layer is 100x as sensitive as the others; loss falls 4x per bit
    # (distinct values: ties make the integer program's branch and bound slow)
    rng = np.random.default_rng(0)
    loss = np.array([[(100.0 if e == 0 else 1.0 + rng.random()) * 4.0 ** -b for b in fm.EXPERT_BITS]
                     for _, e in items])
    part = {(p, b): 4.0 ** -b for p in fm.NON_EXPERT for b in fm.MIXED_PART_BITS[p]}
    assert loss.shape == (len(items), m)
    return items, loss, part


def test_candidates_fit_the_budget_exactly():
    model = _model()
    items, loss, part = _problem(model)
    group = (64, "fp16")
    fixed = dict(list(fm.fixed_bytes(model, group, "rtn").items())[::37])  # a few combinations: cheap
    per = fm.expert_bytes(model.cfg, group)
    low = min(fixed.values()) + len(items) * int(per[1])      # everything at 4 bits (experts at index 1)
    for budget in (low, low + int(per[-1] - per[1]) * 2, low * 2):
        found = fm.candidates(model, budget, part, items, loss, group, fixed, top=3)
        assert found and [c[0] for c in found] == sorted(c[0] for c in found)
        for _, nbytes, bits, widths in found:
            plan = fm.mixed_plan(model.cfg, widths, bits, group, "rtn")
            assert plan_memory(model, plan).total == nbytes <= budget


def test_the_sensitive_experts_get_the_spare_bytes():
    model = _model()
    items, loss, part = _problem(model)
    group = (64, "fp16")
    fixed = fm.fixed_bytes(model, group, "rtn")
    per = fm.expert_bytes(model.cfg, group)
    four = {w: b for w, b in fixed.items() if set(w) == {4}}
    # non-expert parts at 4 bits, experts at 4 bits, plus room to widen two experts to 8 bits
    budget = next(iter(four.values())) + len(items) * int(per[1]) + 2 * int(per[-1] - per[1])
    (_, nbytes, bits, widths), = fm.candidates(model, budget, part, items, loss, group, four, top=1)
    assert set(bits.values()) == {4}
    assert {it for it, b in widths.items() if b > 4} == {(l, 0) for l in model.cfg.moe_layers}
    assert fm.expert_counts(widths) == f"{len(items) - 2}×4 / 2×8"
