"""ERNIE-4.5 MoE (``Ernie4_5_MoeForCausalLM``) adapter."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moec.core.config import MoEConfig
from moec.models.adapter import FamilyAdapter, refuse, require, silu_only
from moec.models.common import base_fields
from moec.models.deepseek import _rope_order


@dataclass(frozen=True)
class Ernie45MoeAdapter(FamilyAdapter):
    """ERNIE-4.5 MoE: softmax scores, experts chosen on scores + ``moe_statics.e_score_correction_bias``
    (gates stay the unbiased scores), renormalised top-k, shared experts; MoE layers are those with
    ``moe_layer_start_index <= i <= moe_layer_end_index`` and ``(i + 1) % moe_layer_interval == 0``,
    the others dense. ERNIE rotates interleaved pairs: the q/k projection rows of each head are
    reordered on load to moec's half rotation (both sides of each dot product alike).
    """

    architectures: tuple[str, ...] = ("Ernie4_5_MoeForCausalLM",)
    shared_prefix: str = "shared_experts"

    def config(self, hf: dict) -> MoEConfig:
        require(hf, "moe_num_experts", "moe_k", "moe_intermediate_size")
        arch = hf["architectures"][0]
        silu_only(hf)
        if hf.get("use_bias"):
            refuse(arch, "use_bias", True, "projections without biases only")
        base = base_fields(hf)
        n = base["num_layers"]
        start, end, step = hf.get("moe_layer_start_index", 1), hf.get("moe_layer_end_index", -1), \
            hf.get("moe_layer_interval", 1)
        end = n - 1 if end in (-1, None) else end
        for field, v in (("moe_layer_start_index", start), ("moe_layer_end_index", end), ("moe_layer_interval", step)):
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if field == "moe_layer_interval" else 0):
                refuse(arch, field, v, "a non-negative layer index (interval >= 1)")
        dense = [i for i in range(n) if not ((i + 1) % step == 0 and start <= i <= end)]
        return MoEConfig(**base, num_experts=hf["moe_num_experts"], top_k=hf["moe_k"],
                         expert_intermediate=hf["moe_intermediate_size"], norm_topk_prob=True,
                         shared_intermediate=hf["moe_intermediate_size"] * (hf.get("moe_num_shared_experts") or 0),
                         dense_layers=dense, dense_intermediate=(hf.get("intermediate_size") or 0) if dense else 0,
                         router_bias=True)

    def _pairs(self, cfg: MoEConfig) -> list[tuple[str, str]]:
        return super()._pairs(cfg) + [(f"layers.{i}.mlp.score_bias", self._bias(i)) for i in cfg.moe_layers]

    @staticmethod
    def _bias(layer: int) -> str:
        return f"model.layers.{layer}.mlp.moe_statics.e_score_correction_bias"

    def converted_hf_shapes(self, cfg: MoEConfig, present: frozenset[str] = frozenset()) -> dict[str, tuple[int, ...]]:
        h, hd = cfg.hidden_size, cfg.head_dim
        out = {}
        for i in range(cfg.num_layers):
            a = f"model.layers.{i}.self_attn"
            out[f"{a}.q_proj.weight"], out[f"{a}.k_proj.weight"] = (cfg.num_heads * hd, h), (cfg.num_kv_heads * hd, h)
        out.update({self._bias(i): (1, cfg.num_experts) for i in cfg.moe_layers})
        return out

    def to_canonical(self, cfg: MoEConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        order = _rope_order(cfg.head_dim)
        for i in range(cfg.num_layers):
            for p in ("q", "k"):
                name = f"model.layers.{i}.self_attn.{p}_proj.weight"
                if name in tensors:
                    w = tensors[name]
                    tensors[name] = w.view(-1, cfg.head_dim, w.shape[-1])[:, order].reshape(w.shape)
            if self._bias(i) in tensors:
                tensors[self._bias(i)] = tensors[self._bias(i)].reshape(-1)
        return super().to_canonical(cfg, tensors)
