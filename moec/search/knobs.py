"""Architecture-knob candidates for a plan: drop or merge rarely-used experts (by the calibration profile's
routing frequency) and set the router temperature. The result is an ordinary plan whose
``dropped_experts`` / ``merged_experts`` / ``router_temperature`` fields the back ends honour
(``moec.models.knobs``)."""

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


def rare_pairs(stats: ExpertStats, max_frequency: float, per_layer: int | None = None) -> dict[int, list[tuple[int, int, float]]]:
    """Merged pairs ``{layer: [(kept, absorbed, share)]}`` of rarely-used experts: per layer the experts with
    routing frequency at most ``max_frequency``, rarest first, paired two by two (at most ``per_layer``
    pairs); the busier of a pair is kept and ``share`` is the absorbed one's part of the pair's routing,
    ``f_absorbed / (f_kept + f_absorbed)``, so the merged weights are the frequency-weighted average."""
    if max_frequency < 0:
        raise MoecError(f"max routing frequency must be >= 0, got {max_frequency}")
    out = {}
    for layer in sorted(stats.layers):
        f = stats.frequency(layer)
        rare = sorted((e for e in range(stats.num_experts) if f[e] <= max_frequency), key=lambda e: (f[e], e))
        pairs = []
        for absorbed, kept in zip(rare[0::2], rare[1::2]):
            total = float(f[kept] + f[absorbed])
            pairs.append((kept, absorbed, float(f[absorbed]) / total if total > 0 else 0.5))
        pairs = pairs if per_layer is None else pairs[:per_layer]
        if pairs:
            out[layer] = pairs
    return out


def with_knobs(plan: BitPlan, dropped: dict[int, list[int]] | None = None,
               router_temperature: float | None = None,
               merged: dict[int, list[tuple[int, int, float]]] | None = None) -> BitPlan:
    """A copy of ``plan`` with the given knobs (``None`` keeps the plan's)."""
    new = plan.copy()
    if merged is not None:
        new.merged_experts = {l: list(p) for l, p in merged.items() if p}
    if dropped is not None:
        new.dropped_experts = {l: sorted(set(ex)) for l, ex in dropped.items() if ex}
    if router_temperature is not None:
        new.router_temperature = float(router_temperature)
    return new
