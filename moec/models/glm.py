"""GLM-4.5 (``Glm4MoeForCausalLM``) adapter: DeepSeek-V3 routing on GQA attention with partial rotary."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from moec.core.config import MoEConfig
from moec.models.adapter import FamilyAdapter, as_float, refuse, require, silu_only
from moec.models.common import base_fields


@dataclass(frozen=True)
class Glm4MoeAdapter(FamilyAdapter):
    """GLM-4.5 / GLM-4.5-Air: sigmoid scores, experts chosen on scores + ``e_score_correction_bias``
    within the ``topk_group`` best of ``n_group`` groups, renormalised gates × ``routed_scaling_factor``
    (DeepSeek-V3's router), shared experts, leading dense layers (``first_k_dense_replace``), q/k/v
    biases, optional per-head q/k RMSNorm (``use_qk_norm``), RoPE on the first
    ``partial_rotary_factor`` of each head. The multi-token-prediction layers after the last decoder
    layer (``num_nextn_predict_layers``) are not used for generation and are dropped on load.
    """

    architectures: tuple[str, ...] = ("Glm4MoeForCausalLM",)
    shared_prefix: str = "shared_experts"

    def config(self, hf: dict) -> MoEConfig:
        require(hf, "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size")
        arch = hf["architectures"][0]
        silu_only(hf)
        base = base_fields(hf)
        head_dim = base["head_dim"] or base["hidden_size"] // base["num_heads"]
        rope = hf.get("rope_parameters") or {}
        factor = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5))
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1 \
                or int(head_dim * factor) % 2:
            refuse(arch, "partial_rotary_factor", factor, "a fraction in (0, 1] giving an even rotary width")
        rotary = int(head_dim * factor)
        groups, topk_group = hf.get("n_group") or 1, hf.get("topk_group") or 1
        grouped = topk_group < groups
        dense = hf.get("first_k_dense_replace") or 0
        return MoEConfig(**base, num_experts=hf["n_routed_experts"], top_k=hf["num_experts_per_tok"],
                         expert_intermediate=hf["moe_intermediate_size"],
                         norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
                         shared_intermediate=hf["moe_intermediate_size"] * (hf.get("n_shared_experts") or 0),
                         dense_layers=list(range(min(dense, base["num_layers"]))),
                         dense_intermediate=(hf.get("intermediate_size") or 0) if dense else 0,
                         attention_bias=bool(hf.get("attention_bias", False)),
                         qk_norm="head" if hf.get("use_qk_norm") else "none",
                         router_scoring="sigmoid", router_bias=True,
                         routed_scale=as_float(hf.get("routed_scaling_factor", 1.0)),
                         expert_groups=groups if grouped else 1, kept_groups=topk_group if grouped else 1,
                         group_score_top=2, rotary_dim=0 if rotary == head_dim else rotary)

    def _pairs(self, cfg: MoEConfig) -> list[tuple[str, str]]:
        bias = "mlp.gate.e_score_correction_bias"
        return super()._pairs(cfg) + [(f"layers.{i}.mlp.score_bias", f"model.layers.{i}.{bias}") for i in cfg.moe_layers]

    def ignores(self, cfg: MoEConfig, name: str) -> bool:
        """The multi-token-prediction layers: ``model.layers.<num_layers + j>.*``."""
        m = re.match(r"model\.layers\.(\d+)\.", name)
        return bool(m) and int(m.group(1)) >= cfg.num_layers

    def to_canonical(self, cfg: MoEConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return super().to_canonical(cfg, {k: v for k, v in tensors.items() if not self.ignores(cfg, k)})
