"""Phi-3.5-MoE (``PhimoeForCausalLM``) adapter: sparsemixer top-2, LayerNorm with bias, biased projections."""

from __future__ import annotations

import math
from dataclasses import dataclass

from moec.core.config import MoEConfig
from moec.models.adapter import FamilyAdapter, as_float, refuse, require, silu_only
from moec.models.common import base_fields
from moec.models.deepseek import _theta


@dataclass(frozen=True)
class PhimoeAdapter(FamilyAdapter):
    """Phi-MoE: Mixtral's tensor names, LayerNorm (weight and bias) for the layer and final norms,
    q/k/v/o biases with ``attention_bias``, an ``lm_head`` bias with ``lm_head_bias``, and the
    sparsemixer router at inference (``router_jitter_noise`` is its epsilon). LongRoPE (the released
    checkpoint's) is run in its short regime, the only one transformers' Phimoe uses for inverse
    frequencies: positions are limited to ``original_max_position_embeddings`` (4096), beyond which
    transformers switches the cos/sin scale to ``long_mscale``.
    """

    architectures: tuple[str, ...] = ("PhimoeForCausalLM",)
    moe_prefix: str = "block_sparse_moe"
    expert_names: tuple[str, str, str] = ("w1", "w3", "w2")

    def config(self, hf: dict) -> MoEConfig:
        require(hf, "num_local_experts", "num_experts_per_tok", "intermediate_size")
        arch = hf["architectures"][0]
        silu_only(hf)
        longrope = _longrope_fields(arch, hf)
        if hf.get("num_experts_per_tok") != 2:
            refuse(arch, "num_experts_per_tok", hf.get("num_experts_per_tok"), "sparsemixer chooses 2 experts")
        window = hf.get("sliding_window")
        if window is not None and window < hf.get("max_position_embeddings", 4096):
            refuse(arch, "sliding_window", window, "full attention only (a window >= max_position_embeddings)")
        bias = bool(hf.get("attention_bias", False))
        base = base_fields({**hf, "rope_parameters": None, "rope_scaling": None, "rope_theta": _theta(hf)})
        if longrope:
            head_dim = base["head_dim"] or base["hidden_size"] // base["num_heads"]
            if len(longrope["short_factor"]) * 2 != head_dim:
                refuse(arch, "rope_parameters.short_factor", f"{len(longrope['short_factor'])} factors",
                       f"one per rotated pair ({head_dim // 2})")
            base["max_position"] = min(base["max_position"], longrope["original"])  # then long_mscale
            longrope = dict(rope_ext_factors=longrope["short_factor"],
                            attention_scale=longrope["mscale"] ** 2 / math.sqrt(head_dim))
        return MoEConfig(**base, num_experts=hf["num_local_experts"], top_k=2,
                         expert_intermediate=hf["intermediate_size"], norm="layer",
                         attention_bias=bias, attention_out_bias=bias, lm_head_bias=bool(hf.get("lm_head_bias", False)),
                         router_scoring="sparsemixer",
                         sparsemixer_eps=as_float(hf.get("router_jitter_noise", 0.01)),
                         **longrope)


def _longrope_fields(arch: str, hf: dict) -> dict:
    """Phi-3.5-MoE's LongRoPE as transformers' Phimoe runs it up to ``original_max_position_embeddings``:
    inverse frequencies divided by ``short_factor``, cos/sin times ``short_mscale`` (q and k each, so
    the scores times its square). {} for plain RoPE."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in ("default", None):
        return {}
    if kind != "longrope":
        refuse(arch, "rope_parameters.rope_type", kind, "plain RoPE or longrope")
    short, mscale = rope.get("short_factor"), rope.get("short_mscale")
    original = rope.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings")
    if not isinstance(short, list) or not short or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in short):
        refuse(arch, "rope_parameters.short_factor", short, "a list of positive factors")
    if isinstance(mscale, bool) or not isinstance(mscale, (int, float)) or mscale <= 0:
        refuse(arch, "rope_parameters.short_mscale", mscale, "a positive number")
    if isinstance(original, bool) or not isinstance(original, int) or original < 1:
        refuse(arch, "rope_parameters.original_max_position_embeddings", original, "a positive integer")
    return {"short_factor": [float(v) for v in short], "mscale": float(mscale), "original": original}
