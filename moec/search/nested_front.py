"""The plan front of a nested bundle: run-time plans with their modelled cost, computed at compile time.

``moec compile --nested B`` stores this list in the manifest (``plan_front``) so that the runtime
(``moec run --adapt latency:MS|energy:J``) picks a plan without torch or a cost model of its own.
The plans are the memory ladder of :func:`moec.runtime.adapt.plan_ladder` (every expert at the
widest width, then coldest experts, by the compile-time profile, evicted to the narrowest width
first, down to every expert at the narrowest), so bytes fall monotonically along it while the
hottest experts keep their width longest: each entry is the widest plan of its byte budget under
that rule. Each entry's cost is the search's: bytes and operations of one decode step expected
over the profile's routing (:func:`moec.hardware.energy_model.decode_traffic`, packed bytes of
each width), energy ``bytes · pJ/byte + ops · pJ/op`` and latency ``bytes / bandwidth + kernel
calls · overhead + step overhead`` with the target's :class:`~moec.search.estimator.AnalyticEstimator`
constants (one nested kernel call per routed-expert weight and MoE layer, whatever the plan).
"""

from __future__ import annotations

import numpy as np

from moec.core.config import MoEConfig
from moec.core.formats import get_nested_format
from moec.core.inventory import expert_shapes
from moec.core.plan import BitPlan
from moec.hardware.energy_model import decode_traffic
from moec.runtime.adapt import plan_ladder
from moec.search.estimator import AnalyticEstimator


def nested_expert_sizes(cfg: MoEConfig, storage_bits: int, group_size: int) -> dict[str, dict[str, int]]:
    """Bytes of one expert's nested arrays per routed weight (the ``per_expert`` of ``BundleSession``)."""
    fmt = get_nested_format(storage_bits)
    out = {}
    for layer in cfg.moe_layers:
        for proj, (n, k) in expert_shapes(cfg).items():
            groups = k // group_size
            row = {f"kseg{s}": n * k * w // 8 for s, w in enumerate(fmt.segment_bits)}
            row.update(kscale=2 * n * groups, kzero=n * -(-groups * storage_bits // 8))
            out[f"layers.{layer}.experts.{proj}"] = row
    return out


def nested_front(cfg: MoEConfig, plan: BitPlan, storage_bits: int, preset,
                 frequencies: dict[int, np.ndarray] | None = None, rungs: int = 8) -> list[dict]:
    """The manifest's ``plan_front``: widest to narrowest, each entry ``{"experts": {layer: [bits]},
    "expert_bytes", "bytes_per_token", "latency_s", "energy_j", "mean_bits"}``."""
    sizes = nested_expert_sizes(cfg, storage_bits, plan.group_size)
    est = AnalyticEstimator.for_target(preset)
    rows = None
    if frequencies:
        rows = np.stack([np.clip(np.asarray(frequencies[l], float), 0.0, 1.0) for l in cfg.moe_layers])
    widths = get_nested_format(storage_bits).derived_bits
    front, seen = [], set()
    for p in plan_ladder(cfg, plan, storage_bits, sizes, rungs, frequencies):
        key = tuple(p.experts[l][e] for l in cfg.moe_layers for e in range(cfg.num_experts))
        if key in seen:
            continue
        seen.add(key)
        nbytes, ops = decode_traffic(cfg, p, rows)
        expert_bytes = 0
        for entry, arrays in sizes.items():
            layer = int(entry.split(".")[1])
            for e in range(cfg.num_experts):
                i = widths.index(p.experts[layer][e])
                expert_bytes += sum(arrays[f"kseg{s}"] for s in range(i + 1)) + arrays["kscale"] + arrays["kzero"]
        latency = nbytes / (est.bandwidth_gbps * 1e9) + len(cfg.moe_layers) * len(expert_shapes(cfg)) \
            * est.kernel_overhead_s + est.step_overhead_s
        front.append({"experts": {str(l): [int(p.experts[l][e]) for e in range(cfg.num_experts)]
                                  for l in cfg.moe_layers},
                      "expert_bytes": int(expert_bytes), "bytes_per_token": float(nbytes),
                      "latency_s": float(latency),
                      "energy_j": float((nbytes * est.pj_per_byte + ops * est.pj_per_op) * 1e-12),
                      "mean_bits": float(np.mean(key))})
    return front
