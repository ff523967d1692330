"""Qwen2-MoE and Qwen3-MoE family adapters (shared expert with sigmoid gate; per-head q/k norm)."""

from __future__ import annotations

from dataclasses import dataclass

from moec.models.adapter import FamilyAdapter, dense_layers_from_hf, pick, require
from moec.models.common import base_fields
from moec.core.config import MoEConfig

EXPERTS = "num_experts|num_local_experts"


@dataclass(frozen=True)
class Qwen2MoeAdapter(FamilyAdapter):
    """Qwen2-MoE: q/k/v biases, a shared expert scaled by sigmoid(shared_expert_gate(x))."""

    architectures: tuple[str, ...] = ("Qwen2MoeForCausalLM",)

    def config(self, hf: dict) -> MoEConfig:
        require(hf, EXPERTS, "num_experts_per_tok", "moe_intermediate_size")
        base = base_fields(hf)
        dense = dense_layers_from_hf(hf, base["num_layers"])
        shared = hf.get("shared_expert_intermediate_size") or 0
        return MoEConfig(**base, num_experts=pick(hf, EXPERTS), top_k=hf["num_experts_per_tok"],
                         expert_intermediate=hf["moe_intermediate_size"],
                         norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                         shared_intermediate=shared, shared_gate=bool(shared),
                         attention_bias=bool(hf.get("qkv_bias", True)),
                         dense_layers=dense, dense_intermediate=hf.get("intermediate_size") or 0)


@dataclass(frozen=True)
class Qwen3MoeAdapter(FamilyAdapter):
    """Qwen3-MoE: RMSNorm per attention head on q and k, no shared expert."""

    architectures: tuple[str, ...] = ("Qwen3MoeForCausalLM",)

    def config(self, hf: dict) -> MoEConfig:
        require(hf, EXPERTS, "num_experts_per_tok", "moe_intermediate_size")
        base = base_fields(hf)
        return MoEConfig(**base, num_experts=pick(hf, EXPERTS), top_k=hf["num_experts_per_tok"],
                         expert_intermediate=hf["moe_intermediate_size"],
                         norm_topk_prob=bool(hf.get("norm_topk_prob", True)), qk_norm="head",
                         attention_bias=bool(hf.get("attention_bias", False)),
                         dense_layers=dense_layers_from_hf(hf, base["num_layers"]),
                         dense_intermediate=hf.get("intermediate_size") or 0)
