"""The plan front of a nested bundle: run-time plans with their modelled cost, computed at compile time.

``moec compile --nested B`` stores this list in the manifest (``plan_front``) so that the runtime
(``moec run --adapt latency:MS|energy:J``) picks a plan without torch or a cost model of its own.
When the compile has a search problem (a profile with sensitivity, i.e. the plan was searched),
the plans are the search's own Pareto plans (:func:`searched_front_plans`): the greedy search run
at ``rungs`` memory budgets from every expert at the narrowest nested width to every expert at
the widest, over the nested widths only, keeping the plans no other found plan beats on both
memory and the search's accuracy loss. Without one, they are the memory ladder of
:func:`moec.runtime.adapt.plan_ladder` (every expert at the widest width, then coldest experts,
by the compile-time profile, evicted to the narrowest width first, down to every expert at the
narrowest). Either way the entries run widest first with bytes falling. Each entry's cost is the search's: bytes and operations of one decode step expected
over the profile's routing (:func:`moec.hardware.energy_model.decode_traffic`, packed bytes of
each width), energy ``bytes · pJ/byte + ops · pJ/op`` and latency ``bytes / bandwidth + kernel
calls · overhead + step overhead`` with the target's :class:`~moec.search.estimator.AnalyticEstimator`
constants (one nested kernel call per routed-expert weight and MoE layer, whatever the plan).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from moec.core.config import MoEConfig
from moec.core.formats import get_nested_format
from moec.core.inventory import expert_shapes
from moec.core.plan import BitPlan
from moec.hardware.energy_model import decode_traffic
from moec.runtime.adapt import plan_ladder
from moec.runtime.plan_switch import width_bytes
from moec.search.cost import CostConfig
from moec.search.driver import SearchOptions, run_search
from moec.search.estimator import AnalyticEstimator
from moec.search.problem import SearchProblem


def nested_expert_sizes(cfg: MoEConfig, storage_bits: int, group_size: int) -> dict[str, dict[str, int]]:
    """Bytes of one expert's nested arrays per routed weight (the ``per_expert`` of ``BundleSession``)."""
    fmt = get_nested_format(storage_bits)
    out = {}
    for layer in cfg.moe_layers:
        for proj, (n, k) in expert_shapes(cfg).items():
            groups = k // group_size
            row = {f"seg{s}": n * k * w // 8 for s, w in enumerate(fmt.segment_bits)}
            row.update(scale=2 * n * groups, zero=n * -(-groups * storage_bits // 8))
            out[f"layers.{layer}.experts.{proj}"] = row
    return out


def searched_front_plans(problem: SearchProblem, storage_bits: int, preset, rungs: int = 8) -> list[BitPlan]:
    """The search's Pareto plans over the nested widths, widest first.

    ``problem`` is restricted to the widths ``storage_bits`` storage serves (columns the profile
    measured); the greedy search (:mod:`moec.search.policies.greedy`) runs at ``rungs`` budgets
    evenly spaced from the all-narrowest plan's memory to the all-widest's; of the plans found,
    those beaten on both memory and accuracy loss (the search's ``CostBreakdown.accuracy``) by
    another, or repeated, are dropped.
    """
    widths = [b for b in get_nested_format(storage_bits).derived_bits if b in problem.bits]
    cols = [problem.bits.index(b) for b in widths]
    sub = dataclasses.replace(problem, bits=tuple(widths), nbytes=problem.nbytes[:, cols], loss=problem.loss[:, cols])
    est = AnalyticEstimator.for_target(preset)
    lo, hi = sub.min_memory(), sub.memory(np.full(sub.n, sub.m - 1))
    found = {}
    for budget in np.linspace(lo, hi, max(rungs, 2)):
        sub.budget_bytes = int(round(budget))
        result = run_search(sub, CostConfig(), est, SearchOptions(policy="greedy"))
        found[tuple(int(a) for a in result.assign)] = (result.cost.memory_bytes, result.cost.accuracy, result.plan)
    points = sorted(found.values(), key=lambda t: (-t[0], t[1]))
    front = [p for p in points if not any(q[0] <= p[0] and q[1] <= p[1] and (q[0], q[1]) != (p[0], p[1])
                                          for q in points)]
    return [plan for _, _, plan in front]


def nested_front(cfg: MoEConfig, plan: BitPlan, storage_bits: int, preset,
                 frequencies: dict[int, np.ndarray] | None = None, rungs: int = 8,
                 problem: SearchProblem | None = None) -> list[dict]:
    """The manifest's ``plan_front``: widest to narrowest, each entry ``{"experts": {layer: [bits]},
    "expert_bytes", "bytes_per_token", "latency_s", "energy_j", "mean_bits"}``; the search's
    Pareto plans when ``problem`` is given, else the memory ladder (module docstring)."""
    sizes = nested_expert_sizes(cfg, storage_bits, plan.group_size)
    est = AnalyticEstimator.for_target(preset)
    rows = None
    if frequencies:
        rows = np.stack([np.clip(np.asarray(frequencies[l], float), 0.0, 1.0) for l in cfg.moe_layers])
    widths = get_nested_format(storage_bits).derived_bits
    front, seen = [], set()
    plans = searched_front_plans(problem, storage_bits, preset, rungs) if problem is not None else \
        plan_ladder(cfg, plan, storage_bits, sizes, rungs, frequencies)
    for p in plans:
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
                expert_bytes += width_bytes(arrays, i + 1)
        latency = nbytes / (est.bandwidth_gbps * 1e9) + len(cfg.moe_layers) * len(expert_shapes(cfg)) \
            * est.kernel_overhead_s + est.step_overhead_s
        front.append({"experts": {str(l): [int(p.experts[l][e]) for e in range(cfg.num_experts)]
                                  for l in cfg.moe_layers},
                      "expert_bytes": int(expert_bytes), "bytes_per_token": float(nbytes),
                      "latency_s": float(latency),
                      "energy_j": float((nbytes * est.pj_per_byte + ops * est.pj_per_op) * 1e-12),
                      "mean_bits": float(np.mean(key))})
    return front
