"""Architecture-knob candidates for a plan: drop rarely-used experts (by the calibration profile's
routing frequency) and set the router temperature. The result is an ordinary plan whose
``dropped_experts`` / ``router_temperature`` fields the back ends honour (``moec.models.knobs``)."""

from __future__ import annotations

from moec.core.errors import MoecError
from moec.core.plan import BitPlan
from moec.profile.stats import ExpertStats


def rare_experts(stats: ExpertStats, max_frequency: float = 0.0, per_layer: int | None = None) -> dict[int, list[int]]:
    """``{layer: [expert]}`` whose routing frequency (fraction of calibration tokens routed to the
    expert) is at most ``max_frequency`` (0: never used), at most ``per_layer`` of them per layer
    (the rarest first), never more than ``num_experts - top_k``."""
    if max_frequency < 0:
        raise MoecError(f"max routing frequency must be >= 0, got {max_frequency}")
    out = {}
    cap = stats.num_experts - stats.top_k
    cap = cap if per_layer is None else min(cap, per_layer)
    for layer in sorted(stats.layers):
        f = stats.frequency(layer)
        rare = sorted((e for e in range(stats.num_experts) if f[e] <= max_frequency), key=lambda e: (f[e], e))
        if rare[:cap]:
            out[layer] = sorted(rare[:cap])
    return out


def with_knobs(plan: BitPlan, dropped: dict[int, list[int]] | None = None,
               router_temperature: float | None = None) -> BitPlan:
    """A copy of ``plan`` with the given knobs (``None`` keeps the plan's)."""
    new = plan.copy()
    if dropped is not None:
        new.dropped_experts = {l: sorted(set(ex)) for l, ex in dropped.items() if ex}
    if router_temperature is not None:
        new.router_temperature = float(router_temperature)
    return new
