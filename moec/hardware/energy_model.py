"""Modelled energy per decode step: bytes moved x pJ/byte + operations x pJ/op (target preset constants).

Used wherever a device has no power meter; results are always labelled ``"modelled"``. Bytes
are the weights a decode step reads in moec's packed layout: every non-expert weight once
(one embedding row), and each routed expert's w1/w3/w2 weighted by how often it is routed.
Operations are 2 per weight element read (a multiply and an add); attention over the KV
cache and elementwise work are left out (small next to the weights at decode).
"""

from __future__ import annotations

import numpy as np

from moec.core.errors import MoecError
from moec.core.config import MoEConfig
from moec.quant.pack import packed_nbytes
from moec.core.inventory import expert_shapes, non_expert_weights
from moec.core.plan import BitPlan


def frequency_rows(cfg: MoEConfig, frequencies: np.ndarray | None) -> dict[int, np.ndarray]:
    """Per MoE layer, P(expert routed) per token; ``frequencies`` is [num_layers, E] or [moe_layers, E].

    ``None`` means uniform routing (``top_k / E`` each).
    """
    layers = cfg.moe_layers
    if frequencies is None:
        return {l: np.full(cfg.num_experts, cfg.top_k / cfg.num_experts) for l in layers}
    f = np.asarray(frequencies, dtype=float)
    if f.ndim != 2 or f.shape[1] != cfg.num_experts or f.shape[0] not in (cfg.num_layers, len(layers)):
        raise MoecError(f"frequencies have shape {f.shape}; expected [{cfg.num_layers} or {len(layers)}, "
                        f"{cfg.num_experts}] (layers x experts)")
    if np.any(f < 0) or np.any(f > 1 + 1e-9):
        raise MoecError("frequencies must be per-token routing probabilities in [0, 1]")
    rows = f if f.shape[0] == len(layers) else f[layers]
    return {l: np.clip(rows[i], 0.0, 1.0) for i, l in enumerate(layers)}


def _nbytes(n: int, k: int, bits: int, group: int) -> int:
    return packed_nbytes(n, k, bits, group)["total"]


def decode_traffic(cfg: MoEConfig, plan: BitPlan, frequencies: np.ndarray | None = None) -> tuple[float, float]:
    """(bytes read, operations) of one decode step under ``plan`` (expected over routing)."""
    g = plan.group_size
    nbytes = ops = 0.0
    for name, (n, k) in non_expert_weights(cfg):
        bits = plan.tensor_bits(name)
        if name == "embed.weight":
            nbytes += _nbytes(1, k, bits, g)
            if cfg.tie_embeddings:  # the same weight is also the lm_head
                nbytes += _nbytes(n, k, bits, g)
                ops += 2.0 * n * k
            continue
        nbytes += _nbytes(n, k, bits, g)
        ops += 2.0 * n * k
    shapes = list(expert_shapes(cfg).values())
    for layer, f in frequency_rows(cfg, frequencies).items():
        for e in range(cfg.num_experts):
            bits = plan.experts[layer][e]
            nbytes += f[e] * sum(_nbytes(n, k, bits, g) for n, k in shapes)
            ops += f[e] * sum(2.0 * n * k for n, k in shapes)
    return nbytes, ops


def decode_energy_j(cfg: MoEConfig, plan: BitPlan, energy_model, frequencies: np.ndarray | None = None) -> float:
    """Modelled joules per decode step (one token) from a preset's ``energy_model``."""
    nbytes, ops = decode_traffic(cfg, plan, frequencies)
    return (nbytes * energy_model.pj_per_byte + ops * energy_model.pj_per_op) * 1e-12
