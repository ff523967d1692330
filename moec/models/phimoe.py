"""Phi-3.5-MoE (``PhimoeForCausalLM``) adapter: sparsemixer top-2, LayerNorm with bias, biased projections."""

from __future__ import annotations

from dataclasses import dataclass

from moec.core.config import MoEConfig
from moec.models.adapter import FamilyAdapter, refuse, require, silu_only
from moec.models.common import base_fields


@dataclass(frozen=True)
class PhimoeAdapter(FamilyAdapter):
    """Phi-MoE: Mixtral's tensor names, LayerNorm (weight and bias) for the layer and final norms,
    q/k/v/o biases with ``attention_bias``, an ``lm_head`` bias with ``lm_head_bias``, and the
    sparsemixer router at inference (``router_jitter_noise`` is its epsilon).
    """

    architectures: tuple[str, ...] = ("PhimoeForCausalLM",)
    moe_prefix: str = "block_sparse_moe"
    expert_names: tuple[str, str, str] = ("w1", "w3", "w2")

    def config(self, hf: dict) -> MoEConfig:
        require(hf, "num_local_experts", "num_experts_per_tok", "intermediate_size")
        arch = hf["architectures"][0]
        silu_only(hf)
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", None):  # Phi-3.5-MoE ships longrope (short/long factors switched by length)
            refuse(arch, "rope_parameters.rope_type", kind, "plain RoPE only")
        if hf.get("num_experts_per_tok") != 2:
            refuse(arch, "num_experts_per_tok", hf.get("num_experts_per_tok"), "sparsemixer chooses 2 experts")
        window = hf.get("sliding_window")
        if window is not None and window < hf.get("max_position_embeddings", 4096):
            refuse(arch, "sliding_window", window, "full attention only (a window >= max_position_embeddings)")
        bias = bool(hf.get("attention_bias", False))
        eps = hf.get("router_jitter_noise", 0.01)
        return MoEConfig(**base_fields(hf), num_experts=hf["num_local_experts"], top_k=2,
                         expert_intermediate=hf["intermediate_size"], norm="layer",
                         attention_bias=bias, attention_out_bias=bias, lm_head_bias=bool(hf.get("lm_head_bias", False)),
                         router_scoring="sparsemixer",
                         sparsemixer_eps=float(eps) if isinstance(eps, int) and not isinstance(eps, bool) else eps)
