"""Per-step expert bit-widths for shift-robust training: the plan, or the plan with experts moved ±1 step."""

from __future__ import annotations

import random

from moec.core.errors import MoecError
from moec.core.formats import DEFAULT_ALLOWED, FLOAT_BITS
from moec.core.plan import BitPlan

#: Integer widths a shift moves between (the kernels' widths; float experts are never shifted).
SHIFT_BITS: tuple[int, ...] = tuple(b for b in DEFAULT_ALLOWED if b != FLOAT_BITS)


def neighbours(bits: int, allowed: tuple[int, ...] = SHIFT_BITS) -> list[int]:
    """The widths one step below and above ``bits`` in ``allowed`` (none for float or unknown widths)."""
    if bits not in allowed:
        return []
    i = allowed.index(bits)
    return [allowed[j] for j in (i - 1, i + 1) if 0 <= j < len(allowed)]


class BitSampler:
    """Draws each step's expert bits.

    ``mode``: ``"plan"`` keeps the plan's bits; ``"neighbours"`` moves each expert, with probability
    ``shift_prob``, to a width one step below or above its plan width in ``allowed`` (so plans the
    search or a run-time policy derives from it are trained too); ``"all"`` draws each expert's
    width uniformly from ``allowed``. Non-expert weights always keep the plan's bits.
    """

    def __init__(self, plan: BitPlan, mode: str = "plan", shift_prob: float = 0.5,
                 allowed: tuple[int, ...] = SHIFT_BITS, seed: int = 0) -> None:
        if mode not in ("plan", "neighbours", "all"):
            raise MoecError(f"unknown shift mode '{mode}'; choices: plan, neighbours, all")
        if not 0.0 <= shift_prob <= 1.0:
            raise MoecError(f"shift probability must be in [0, 1], got {shift_prob}")
        self.plan, self.mode, self.shift_prob, self.allowed = plan, mode, shift_prob, tuple(allowed)
        self.rng = random.Random(seed)

    def choices(self, bits: int) -> list[int]:
        """Every width an expert planned at ``bits`` can be trained at."""
        if self.mode == "plan" or bits == FLOAT_BITS:
            return [bits]
        if self.mode == "all":
            return sorted(set(self.allowed) | {bits})
        return sorted({bits, *neighbours(bits, self.allowed)})

    def sample(self) -> dict[int, dict[int, int]]:
        """``{layer: {expert: bits}}`` for one step."""
        out: dict[int, dict[int, int]] = {}
        for layer, experts in self.plan.experts.items():
            row = {}
            for e, bits in experts.items():
                if self.mode == "neighbours" and bits != FLOAT_BITS and self.rng.random() < self.shift_prob:
                    near = neighbours(bits, self.allowed)
                    row[e] = self.rng.choice(near) if near else bits
                elif self.mode == "all" and bits != FLOAT_BITS:
                    row[e] = self.rng.choice(self.allowed)
                else:
                    row[e] = bits
            out[layer] = row
        return out


def shifted_plan(plan: BitPlan, rng: random.Random, allowed: tuple[int, ...] = SHIFT_BITS) -> BitPlan:
    """``plan`` with every integer-width expert moved one step down or up in ``allowed`` (at random)."""
    new = plan.copy()
    for layer, experts in new.experts.items():
        for e, bits in experts.items():
            near = neighbours(bits, allowed)
            if near:
                experts[e] = rng.choice(near)
    new.provenance = {**plan.provenance, "shifted_from": plan.provenance.get("policy", "plan")}
    return new
