"""Plans shared by the lowering tests (a fixture module: tests import helpers from here, not from each other)."""

from __future__ import annotations

from moec.core.plan import BitPlan


def mixed_plan(cfg, attention: int = 8, lm_head: int = 4, embeddings: int = 3) -> BitPlan:
    """Experts cycling through 2, 3, 4, 8 and 16 bits; 8-bit attention, 4-bit lm_head, 3-bit embeddings."""
    bits = [2, 3, 4, 8, 16]
    experts = {l: {e: bits[(l + e) % 5] for e in range(cfg.num_experts)} for l in cfg.moe_layers}
    return BitPlan(experts, {"attention": attention, "lm_head": lm_head, "embeddings": embeddings}, group_size=32, method="mse",
                   model_fingerprint=cfg.fingerprint())
