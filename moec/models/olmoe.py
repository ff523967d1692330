"""OLMoE family adapter (RMSNorm over the full q and k projections, un-normalised top-k by default)."""

from __future__ import annotations

from dataclasses import dataclass

from moec.core.errors import MoecError
from moec.models.adapter import FamilyAdapter, pick, require
from moec.models.common import base_fields
from moec.core.config import MoEConfig


@dataclass(frozen=True)
class OlmoeAdapter(FamilyAdapter):
    architectures: tuple[str, ...] = ("OlmoeForCausalLM",)

    def config(self, hf: dict) -> MoEConfig:
        require(hf, "num_experts|num_local_experts", "num_experts_per_tok", "intermediate_size")
        if hf.get("clip_qkv") is not None:
            raise MoecError("OLMoE clip_qkv is not supported yet")
        return MoEConfig(**base_fields(hf), num_experts=pick(hf, "num_experts|num_local_experts"), top_k=hf["num_experts_per_tok"],
                         expert_intermediate=hf["intermediate_size"],
                         norm_topk_prob=bool(hf.get("norm_topk_prob", False)), qk_norm="full",
                         attention_bias=bool(hf.get("attention_bias", False)))
