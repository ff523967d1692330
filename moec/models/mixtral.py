"""Mixtral family adapter (softmax router, renormalised top-k, block_sparse_moe.experts.N.w1/w3/w2)."""

from __future__ import annotations

from dataclasses import dataclass

from moec.core.errors import MoecError
from moec.models.adapter import FamilyAdapter, require
from moec.models.common import base_fields, base_hf_config
from moec.core.config import MoEConfig


@dataclass(frozen=True)
class MixtralAdapter(FamilyAdapter):
    architectures: tuple[str, ...] = ("MixtralForCausalLM",)
    moe_prefix: str = "block_sparse_moe"
    expert_names: tuple[str, str, str] = ("w1", "w3", "w2")

    def config(self, hf: dict) -> MoEConfig:
        require(hf, "num_local_experts", "num_experts_per_tok", "intermediate_size")
        return MoEConfig(**base_fields(hf), num_experts=hf["num_local_experts"],
                         top_k=hf["num_experts_per_tok"], expert_intermediate=hf["intermediate_size"],
                         norm_topk_prob=True)

    def to_hf_config(self, cfg: MoEConfig) -> dict:
        if cfg.shared_intermediate or cfg.dense_layers or cfg.qk_norm != "none" or cfg.attention_bias:
            raise MoecError("this model has features a Mixtral checkpoint cannot express")
        return {**base_hf_config(cfg), "model_type": "mixtral", "num_local_experts": cfg.num_experts,
                "num_experts_per_tok": cfg.top_k, "intermediate_size": cfg.expert_intermediate,
                "sliding_window": None, "router_aux_loss_coef": 0.0}
