"""DeepSeek-V2 and -V3 family adapters: multi-head latent attention, scaled/biased routing, leading dense layers."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moec.core.config import MoEConfig
from moec.core.errors import MoecError
from moec.models.adapter import FamilyAdapter, _take, require
from moec.models.adapter import refuse as _refuse
from moec.models.common import base_fields


def _rope_order(dr: int) -> torch.Tensor:
    """Row order turning DeepSeek's interleaved RoPE pairs (x0, x1), (x2, x3)… into half rotation."""
    return torch.cat([torch.arange(0, dr, 2), torch.arange(1, dr, 2)])


def _theta(hf: dict):
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    return hf.get("rope_theta") or rope.get("rope_theta") or 10000.0


def _yarn_fields(arch: str, hf: dict, query_dim: int, rotary_all: bool = False) -> dict:
    """MoEConfig fields of YaRN RoPE (the released V2-Lite/V3 and gpt-oss configs), {} for plain RoPE.

    YaRN multiplies cos/sin by an attention factor; when RoPE covers the whole head (``rotary_all``,
    gpt-oss) that is the factor squared on the softmax scale, otherwise it must be 1 (DeepSeek).
    """
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in ("default", None):
        return {}
    if kind != "yarn":
        _refuse(arch, "rope_parameters.rope_type", kind, "plain RoPE or YaRN only")
    factor = rope.get("factor")
    original = rope.get("original_max_position_embeddings")
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor <= 1 or not isinstance(original, int):
        _refuse(arch, "rope_parameters.factor", factor, "YaRN needs factor > 1 and original_max_position_embeddings")
    truncate = rope.get("truncate", True)
    if not isinstance(truncate, bool):
        _refuse(arch, "rope_parameters.truncate", truncate, "true or false")

    def m(scale_of_log):  # YaRN's magnitude correction 0.1 * s * ln(factor) + 1
        return 0.1 * scale_of_log * math.log(factor) + 1.0

    mscale, mscale_all = rope.get("mscale"), rope.get("mscale_all_dim")
    cos_sin = rope.get("attention_factor") or (m(mscale) / m(mscale_all) if mscale and mscale_all else m(1.0))
    if abs(cos_sin - 1.0) > 1e-12 and not rotary_all:  # scales only the RoPE'd part of q and k
        _refuse(arch, "rope_parameters.mscale", mscale, "YaRN with mscale == mscale_all_dim only")
    scale = query_dim ** -0.5 * (cos_sin ** 2 if rotary_all else m(mscale_all) ** 2 if mscale_all else 1.0)
    return dict(rope_factor=float(factor), rope_original_max=original, rope_truncate=truncate,
                rope_beta_fast=float(rope.get("beta_fast") or 32), rope_beta_slow=float(rope.get("beta_slow") or 1),
                attention_scale=scale)


@dataclass(frozen=True)
class DeepseekAdapter(FamilyAdapter):
    """DeepSeek-V2 (softmax scores) and -V3 (sigmoid scores, choice bias ``e_score_correction_bias``).

    The checkpoint's ``kv_b_proj`` is split at load into the per-head ``k_up`` (its key rows,
    transposed) and ``v_up`` (its value rows) of :func:`moec.arch.blocks.latent_attention`, and
    the RoPE rows of the query and ``kv_a_proj_with_mqa`` are reordered from interleaved pairs
    to moec's half rotation (both sides of each dot product alike, so scores are unchanged).
    """

    architectures: tuple[str, ...] = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")
    shared_prefix: str = "shared_experts"

    def config(self, hf: dict) -> MoEConfig:
        require(hf, "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "kv_lora_rank",
                "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
        arch = hf["architectures"][0]
        v3 = arch == "DeepseekV3ForCausalLM"
        if hf.get("attention_bias"):
            _refuse(arch, "attention_bias", True, "MLA projections without biases only")
        if hf.get("mlp_bias"):
            _refuse(arch, "mlp_bias", True, "MLPs without biases only")
        if hf.get("hidden_act", "silu") != "silu":
            _refuse(arch, "hidden_act", hf.get("hidden_act"), "SwiGLU with silu only")
        if v3 and hf.get("rope_interleave", True) is not True:
            _refuse(arch, "rope_interleave", hf.get("rope_interleave"), "interleaved RoPE only")
        method = hf.get("topk_method", "noaux_tc" if v3 else "greedy")
        groups, topk_group = hf.get("n_group") or 1, hf.get("topk_group") or 1
        grouped = (v3 or method == "group_limited_greedy") and topk_group < groups
        if not v3 and hf.get("norm_topk_prob"):  # transformers' V2 never renormalises, DeepSeek's code does
            _refuse(arch, "norm_topk_prob", True, "the reference implementations disagree on it")
        if not v3 and method not in ("greedy", "group_limited_greedy"):
            _refuse(arch, "topk_method", method, "greedy or group_limited_greedy")
        nope, rope = hf["qk_nope_head_dim"], hf["qk_rope_head_dim"]
        yarn = _yarn_fields(arch, hf, nope + rope)
        base = base_fields({**hf, "rope_parameters": None, "rope_scaling": None, "rope_theta": _theta(hf)})
        dense = hf.get("first_k_dense_replace") or 0
        shared = hf.get("n_shared_experts") or 0
        scale = hf.get("routed_scaling_factor", 1.0)
        return MoEConfig(**{**base, "head_dim": nope + rope}, num_experts=hf["n_routed_experts"],
                         top_k=hf["num_experts_per_tok"], expert_intermediate=hf["moe_intermediate_size"],
                         norm_topk_prob=v3 and bool(hf.get("norm_topk_prob", True)),
                         shared_intermediate=hf["moe_intermediate_size"] * shared,
                         dense_layers=list(range(min(dense, base["num_layers"]))),
                         dense_intermediate=(hf.get("intermediate_size") or 0) if dense else 0,
                         attention="mla", q_lora_rank=hf.get("q_lora_rank") or 0, kv_lora_rank=hf["kv_lora_rank"],
                         qk_nope_dim=nope, qk_rope_dim=rope, v_head_dim=hf["v_head_dim"],
                         router_scoring="sigmoid" if v3 else "softmax", router_bias=v3,
                         routed_scale=float(scale) if isinstance(scale, int) and not isinstance(scale, bool) else scale,
                         expert_groups=groups if grouped else 1, kept_groups=topk_group if grouped else 1,
                         group_score_top=2 if v3 else 1, **yarn)

    def _pairs(self, cfg: MoEConfig) -> list[tuple[str, str]]:
        pairs = [(ours, theirs) for ours, theirs in super()._pairs(cfg) if ".attn." not in ours]
        for i in range(cfg.num_layers):
            c, h = f"layers.{i}.attn", f"model.layers.{i}.self_attn"
            names = [("q_a_proj", "q_a_proj"), ("q_a_norm", "q_a_layernorm"), ("q_b_proj", "q_b_proj")] \
                if cfg.q_lora_rank else [("q_proj", "q_proj")]
            names += [("kv_a_proj", "kv_a_proj_with_mqa"), ("kv_norm", "kv_a_layernorm"), ("o_proj", "o_proj")]
            pairs += [(f"{c}.{ours}.weight", f"{h}.{theirs}.weight") for ours, theirs in names]
            if cfg.router_bias and i not in cfg.dense_layers:
                pairs.append((f"layers.{i}.mlp.score_bias", f"model.layers.{i}.mlp.gate.e_score_correction_bias"))
        return pairs

    def converted_hf_shapes(self, cfg: MoEConfig, present: frozenset[str] = frozenset()) -> dict[str, tuple[int, ...]]:
        shape = (cfg.num_heads * (cfg.qk_nope_dim + cfg.v_head_dim), cfg.kv_lora_rank)
        return {f"model.layers.{i}.self_attn.kv_b_proj.weight": shape for i in range(cfg.num_layers)}

    def to_canonical(self, cfg: MoEConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        nh, dn, dr, r = cfg.num_heads, cfg.qk_nope_dim, cfg.qk_rope_dim, cfg.kv_lora_rank
        order = _rope_order(dr)
        split = {}
        for i in range(cfg.num_layers):
            h = f"model.layers.{i}.self_attn"
            kv_b = _take(tensors, f"{h}.kv_b_proj.weight")
            if tuple(kv_b.shape) != (nh * (dn + cfg.v_head_dim), r):
                raise MoecError(f"checkpoint tensor '{h}.kv_b_proj.weight' has shape {list(kv_b.shape)}; "
                                "it disagrees with config.json")
            w = kv_b.view(nh, dn + cfg.v_head_dim, r)
            split[f"layers.{i}.attn.k_up.weight"] = w[:, :dn, :].transpose(1, 2).contiguous()
            split[f"layers.{i}.attn.v_up.weight"] = w[:, dn:, :].contiguous()
            q = f"{h}.q_b_proj.weight" if cfg.q_lora_rank else f"{h}.q_proj.weight"
            if q in tensors:
                wq = tensors[q].view(nh, dn + dr, -1)
                tensors[q] = torch.cat([wq[:, :dn], wq[:, dn:][:, order]], dim=1).reshape(nh * (dn + dr), -1)
            kv_a = f"{h}.kv_a_proj_with_mqa.weight"
            if kv_a in tensors and tensors[kv_a].shape[0] == r + dr:
                tensors[kv_a] = torch.cat([tensors[kv_a][:r], tensors[kv_a][r:][order]])
        state = super().to_canonical(cfg, tensors)
        state.update(split)
        return state

    def to_hf(self, cfg: MoEConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise MoecError(f"saving {cfg.architecture} checkpoints is not supported")
