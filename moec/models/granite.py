"""Granite-3 MoE adapters (``GraniteMoeForCausalLM``, ``GraniteMoeSharedForCausalLM``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moec.core.config import MoEConfig
from moec.models.adapter import FamilyAdapter, _take, as_float, refuse, require, silu_only
from moec.models.common import base_fields


def _positive(hf: dict, key: str) -> float:
    v = hf.get(key, 1.0)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        refuse(hf["architectures"][0], key, v, "a positive number")
    return float(v)


@dataclass(frozen=True)
class GraniteMoeAdapter(FamilyAdapter):
    """Granite MoE: embeddings × ``embedding_multiplier``, each block's output × ``residual_multiplier``,
    attention softmax scale ``attention_multiplier``, logits ÷ ``logits_scaling``; softmax over the
    top-k router logits (= renormalised top-k); experts fused as ``input_linear`` ``[E, 2I, H]``
    (gate rows, then up rows) and ``output_linear`` ``[E, H, I]``; the Shared variant adds a dense
    ``shared_mlp`` (fused the same way) to every MoE block's output.
    """

    architectures: tuple[str, ...] = ("GraniteMoeForCausalLM", "GraniteMoeSharedForCausalLM")
    moe_prefix: str = "block_sparse_moe"
    router: str = "router.layer"

    def config(self, hf: dict) -> MoEConfig:
        require(hf, "num_local_experts", "num_experts_per_tok", "intermediate_size")
        silu_only(hf)
        bias = bool(hf.get("attention_bias", False))
        return MoEConfig(**base_fields(hf), num_experts=hf["num_local_experts"], top_k=hf["num_experts_per_tok"],
                         expert_intermediate=hf["intermediate_size"], norm_topk_prob=True,
                         shared_intermediate=hf.get("shared_intermediate_size") or 0,
                         attention_bias=bias, attention_out_bias=bias,
                         attention_scale=as_float(hf.get("attention_multiplier", 1.0)),
                         embedding_scale=as_float(hf.get("embedding_multiplier", 1.0)),
                         residual_scale=as_float(hf.get("residual_multiplier", 1.0)),
                         logits_scale=1.0 / _positive(hf, "logits_scaling"))

    def _pairs(self, cfg: MoEConfig) -> list[tuple[str, str]]:
        return [(ours, theirs) for ours, theirs in super()._pairs(cfg) if ".mlp.shared." not in ours]

    def converted_hf_shapes(self, cfg: MoEConfig, present: frozenset[str] = frozenset()) -> dict[str, tuple[int, ...]]:
        e, i, h, s = cfg.num_experts, cfg.expert_intermediate, cfg.hidden_size, cfg.shared_intermediate
        out = {}
        for layer in cfg.moe_layers:
            m = f"model.layers.{layer}"
            out[f"{m}.{self.moe_prefix}.input_linear.weight"] = (e, 2 * i, h)
            out[f"{m}.{self.moe_prefix}.output_linear.weight"] = (e, h, i)
            if s:
                out[f"{m}.shared_mlp.input_linear.weight"] = (2 * s, h)
                out[f"{m}.shared_mlp.output_linear.weight"] = (h, s)
        return out

    def to_canonical(self, cfg: MoEConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        shared = {}
        for layer in cfg.moe_layers:
            m = f"model.layers.{layer}"
            fused = f"{m}.{self.moe_prefix}.input_linear.weight"
            if fused in tensors:  # the checkpoint layout; transformers 5's experts.gate_up_proj loads as is
                tensors[f"{m}.{self.moe_prefix}.experts.gate_up_proj"] = tensors.pop(fused)
                tensors[f"{m}.{self.moe_prefix}.experts.down_proj"] = _take(
                    tensors, f"{m}.{self.moe_prefix}.output_linear.weight")
            if cfg.shared_intermediate:
                c = f"layers.{layer}.mlp.shared"
                gate, up = _take(tensors, f"{m}.shared_mlp.input_linear.weight").chunk(2, dim=0)
                shared.update({f"{c}.w1.weight": gate, f"{c}.w3.weight": up,
                               f"{c}.w2.weight": _take(tensors, f"{m}.shared_mlp.output_linear.weight")})
        state = super().to_canonical(cfg, tensors)
        state.update(shared)
        return state
