"""Run-time plan policies of nested bundles: a routed-expert memory budget met by demoting the coldest experts.

``memory_plan`` starts from every expert at the storage's widest width and evicts experts to the
narrowest width, coldest first (lowest calibration routing frequency; the bundle's
``profile.json`` when it was compiled with ``--data``, else every expert equally hot and layer /
expert order decides), until the bytes the plan reads fit the budget; the last expert demoted
then gets the widest width that still fits. The budget counts routed-expert bytes (planes,
scales, zeros of every expert once); other weights are fixed at compile time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moec.core.config import MoEConfig
from moec.core.errors import MoecError
from moec.core.formats import get_nested_format
from moec.core.io import read_json
from moec.core.plan import BitPlan


def memory_plan(cfg: MoEConfig, base: BitPlan, storage_bits: int, per_expert: dict[str, dict[str, int]],
                budget_bytes: float, frequencies: dict[int, np.ndarray] | None = None) -> BitPlan:
    """The plan (``base`` with new expert widths) whose routed experts read at most ``budget_bytes``.

    ``per_expert`` is what ``BundleSession`` keeps: one expert's bytes of each nested array per entry.
    Raises a one-line :class:`MoecError` when even every expert at the narrowest width does not fit.
    """
    fmt = get_nested_format(storage_bits)
    widths = fmt.derived_bits
    sizes: dict[int, list[int]] = {}  # layer -> bytes of one expert at each width
    for entry, arrays in per_expert.items():
        layer = int(entry.split(".")[1])
        row = sizes.setdefault(layer, [0] * len(widths))
        for i in range(len(widths)):
            row[i] += sum(arrays[f"kseg{s}"] for s in range(i + 1)) + arrays["kscale"] + arrays["kzero"]
    experts = [(layer, e) for layer in cfg.moe_layers for e in range(cfg.num_experts)]
    freq = {(l, e): float(frequencies[l][e]) if frequencies and l in frequencies else 0.0 for l, e in experts}
    level = {x: len(widths) - 1 for x in experts}
    total = sum(sizes[l][-1] for l, _ in experts)
    smallest = sum(sizes[l][0] for l, _ in experts)
    if smallest > budget_bytes:
        raise MoecError(f"memory budget {budget_bytes / 1e6:.3f} MB is below the narrowest plan's "
                        f"{smallest / 1e6:.3f} MB of routed experts (every expert at {widths[0]} bits)")
    for x in sorted(experts, key=lambda x: (freq[x], x)):  # coldest first
        if total <= budget_bytes:
            break
        layer = x[0]
        total -= sizes[layer][-1] - sizes[layer][0]
        level[x] = 0
        last = x
    else:
        last = None
    if total <= budget_bytes and last is not None:  # the last evicted expert takes the widest width that fits
        layer = last[0]
        for i in range(len(widths) - 1, 0, -1):
            if total - sizes[layer][0] + sizes[layer][i] <= budget_bytes:
                total += sizes[layer][i] - sizes[layer][0]
                level[last] = i
                break
    plan = base.copy()
    plan.experts = {layer: {e: widths[level[(layer, e)]] for e in range(cfg.num_experts)} for layer in cfg.moe_layers}
    plan.provenance = {"policy": f"adapt-memory-{budget_bytes / 1e6:.3f}MB"}
    return plan


def parse_adapt(spec: str) -> float:
    """``memory:MB`` → the budget in bytes; a one-line error for anything else."""
    kind, _, value = spec.partition(":")
    if kind in ("latency", "energy"):
        raise MoecError(f"--adapt {kind}:… is not implemented yet; use memory:MB")
    try:
        mb = float(value)
    except ValueError:
        mb = -1.0
    if kind != "memory" or not mb > 0:
        raise MoecError(f"--adapt expects memory:MB (a positive number of megabytes), got {spec[:40]!r}")
    return mb * 1e6



def profile_frequencies(path: Path) -> dict[int, np.ndarray]:
    """Per-layer routing frequencies of a bundle's ``profile.json`` (``moec.profile.stats`` JSON, read
    without torch: the runtime stays light)."""
    d = read_json(path, "profile")
    try:
        return {int(layer): np.asarray(v["frequency"], dtype=float) for layer, v in d["derived"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise MoecError(f"profile '{path}' is malformed: {exc}") from None
