"""Per-step expert bit-widths for shift-robust training: the plan, or the plan with experts moved ±1 step."""

from __future__ import annotations

import math
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

    ``frequency`` (``{layer: [routing frequency per expert]}``, from the calibration profile) weights
    the draws by how often each expert fires. With ``w`` = the expert's frequency divided by the
    largest in its layer (0 never used … 1 the busiest): ``"neighbours"`` shifts it with probability
    ``shift_prob * (1 - w / 2)`` and, when shifted, up (rather than down) with probability
    ``(1 + w) / 2``; ``"all"`` draws width ``allowed[i]`` (of n) with probability proportional to
    ``exp(2 w i / (n - 1))``. Rarely-used experts are thus trained across widths; busy ones stay near
    or above their plan width, where their errors cost most.

    ``plan_prob``: the share of steps that use the plan unchanged (drawn once per step, before any
    expert is shifted). With ``"neighbours"``, ``shift_prob=1`` and no ``frequency``, the other steps draw
    exactly the plans :func:`shifted_plan` makes (every expert one step down or up), so training samples
    the mixture "the plan, or a shifted plan" that a search / run-time policy deploys.
    """

    def __init__(self, plan: BitPlan, mode: str = "plan", shift_prob: float = 0.5,
                 allowed: tuple[int, ...] = SHIFT_BITS, seed: int = 0,
                 frequency: dict[int, list[float]] | None = None, plan_prob: float = 0.0) -> None:
        if mode not in ("plan", "neighbours", "all"):
            raise MoecError(f"unknown shift mode '{mode}'; choices: plan, neighbours, all")
        if not 0.0 <= shift_prob <= 1.0:
            raise MoecError(f"shift probability must be in [0, 1], got {shift_prob}")
        if not 0.0 <= plan_prob <= 1.0:
            raise MoecError(f"plan probability must be in [0, 1], got {plan_prob}")
        self.plan_prob = plan_prob
        self.plan, self.mode, self.shift_prob, self.allowed = plan, mode, shift_prob, tuple(allowed)
        self.rng = random.Random(seed)
        self.weight = _relative(plan, frequency) if frequency is not None else None

    def _w(self, layer: int, expert: int) -> float | None:
        return None if self.weight is None else self.weight[layer][expert]

    def choices(self, bits: int) -> list[int]:
        """Every width an expert planned at ``bits`` can be trained at."""
        if self.mode == "plan" or bits == FLOAT_BITS:
            return [bits]
        if self.mode == "all":
            return sorted(set(self.allowed) | {bits})
        return sorted({bits, *neighbours(bits, self.allowed)})

    def sample(self) -> dict[int, dict[int, int]]:
        """``{layer: {expert: bits}}`` for one step."""
        if self.mode != "plan" and self.plan_prob > 0 and self.rng.random() < self.plan_prob:
            return {layer: dict(experts) for layer, experts in self.plan.experts.items()}
        out: dict[int, dict[int, int]] = {}
        for layer, experts in self.plan.experts.items():
            row = {}
            for e, bits in experts.items():
                w = self._w(layer, e)
                prob = self.shift_prob if w is None else self.shift_prob * (1 - w / 2)
                if self.mode == "neighbours" and bits != FLOAT_BITS and self.rng.random() < prob:
                    near = neighbours(bits, self.allowed)
                    if len(near) == 2 and w is not None:
                        row[e] = near[1] if self.rng.random() < (1 + w) / 2 else near[0]
                    else:
                        row[e] = self.rng.choice(near) if near else bits
                elif self.mode == "all" and bits != FLOAT_BITS:
                    n = len(self.allowed)
                    tilt = [math.exp(2 * w * i / max(n - 1, 1)) for i in range(n)] if w is not None else None
                    row[e] = self.rng.choices(self.allowed, weights=tilt)[0]
                else:
                    row[e] = bits
            out[layer] = row
        return out


def _relative(plan: BitPlan, frequency: dict[int, list[float]]) -> dict[int, list[float]]:
    """Each expert's routing frequency over the largest in its layer, for every layer of ``plan``."""
    out = {}
    for layer, experts in plan.experts.items():
        f = frequency.get(layer)
        if f is None or len(f) < len(experts) or any(not math.isfinite(x) or x < 0 for x in f):
            raise MoecError(f"routing frequencies do not cover layer {layer}'s {len(experts)} experts "
                            "(a profile of another model?)")
        top = max(f)
        out[layer] = [x / top if top > 0 else 0.0 for x in f]
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
