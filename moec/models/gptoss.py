"""gpt-oss family adapter: attention sinks, alternating sliding-window attention, biased experts with
gpt-oss's clamped SwiGLU, softmax over the top-k router logits, YaRN RoPE, MXFP4 experts."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moec.core.config import MoEConfig
from moec.core.errors import MoecError
from moec.models.adapter import FamilyAdapter, _take, require
from moec.models.common import base_fields
from moec.models.deepseek import _refuse, _theta, _yarn_fields
from moec.models.mxfp4 import dequantize_mxfp4

LAYER_TYPES = ("sliding_attention", "full_attention")


def _positive(arch: str, hf: dict, name: str, default: float) -> float:
    v = hf.get(name, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        _refuse(arch, name, v, "a positive number")
    return float(v)


@dataclass(frozen=True)
class GptOssAdapter(FamilyAdapter):
    """gpt-oss (``GptOssForCausalLM``).

    Experts load from transformers' fused layout (``gate_up_proj [E, H, 2I]`` with gate and up
    interleaved column by column, ``down_proj [E, I, H]``, i.e. ``x @ W``) or from the released
    MXFP4 layout (``gate_up_proj_blocks``/``_scales`` ``[E, 2I, H/32, 16|·]``, rows interleaved),
    which is dequantized to float32 on load; the biases (``*_proj_bias``) are float in both.
    """

    architectures: tuple[str, ...] = ("GptOssForCausalLM",)
    router: str = "router"

    def config(self, hf: dict) -> MoEConfig:
        require(hf, "num_local_experts|num_experts", "num_experts_per_tok", "intermediate_size")
        arch = hf["architectures"][0]
        base = base_fields({**hf, "rope_parameters": None, "rope_scaling": None, "rope_theta": _theta(hf)})
        n = base["num_layers"]
        types = hf.get("layer_types") or [LAYER_TYPES[(i + 1) % 2] for i in range(n)]
        if not isinstance(types, list) or len(types) != n or any(t not in LAYER_TYPES for t in types):
            _refuse(arch, "layer_types", types if isinstance(types, list) and len(types) < 5 else "[…]",
                    f"{n} entries of {'/'.join(LAYER_TYPES)}")
        sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
        window = hf.get("sliding_window") or 0
        if sliding and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
            _refuse(arch, "sliding_window", hf.get("sliding_window"), "sliding layers need a positive window")
        if hf.get("hidden_act", "silu") != "silu":
            _refuse(arch, "hidden_act", hf.get("hidden_act"), "gpt-oss's clamped SwiGLU only")
        if hf.get("attention_dropout"):
            _refuse(arch, "attention_dropout", hf.get("attention_dropout"), "inference without dropout only")
        bias = hf.get("attention_bias", True)
        if not isinstance(bias, bool):
            _refuse(arch, "attention_bias", bias, "true or false")
        experts = hf.get("num_local_experts") or hf.get("num_experts")
        yarn = _yarn_fields(arch, hf, base["head_dim"] or base["hidden_size"] // base["num_heads"], rotary_all=True)
        return MoEConfig(**base, num_experts=experts, top_k=hf["num_experts_per_tok"],
                         expert_intermediate=hf["intermediate_size"], norm_topk_prob=False,
                         attention_bias=bias, attention_out_bias=bias, attention_sinks=True,
                         sliding_window=window if sliding else 0, sliding_layers=sliding,
                         router_scoring="topk_softmax", router_logit_bias=True, expert_bias=True,
                         swiglu_limit=_positive(arch, hf, "swiglu_limit", 7.0),
                         swiglu_alpha=_positive(arch, hf, "swiglu_alpha", 1.702), **yarn)

    def _pairs(self, cfg: MoEConfig) -> list[tuple[str, str]]:
        pairs = super()._pairs(cfg)
        for i in range(cfg.num_layers):
            c, h = f"layers.{i}", f"model.layers.{i}"
            pairs += [(f"{c}.attn.sinks", f"{h}.self_attn.sinks"), (f"{c}.mlp.router.bias", f"{h}.mlp.router.bias")]
        return pairs

    def converted_hf_shapes(self, cfg: MoEConfig, present: frozenset[str] = frozenset()) -> dict[str, tuple[int, ...]]:
        """The experts of each layer, in the MXFP4 layout where ``present`` has it, else the fused one."""
        e, i, h = cfg.num_experts, cfg.expert_intermediate, cfg.hidden_size
        out = {}
        for layer in cfg.moe_layers:
            m = f"model.layers.{layer}.mlp.experts"
            out.update({f"{m}.gate_up_proj_bias": (e, 2 * i), f"{m}.down_proj_bias": (e, h)})
            if f"{m}.gate_up_proj_blocks" in present:
                out.update({f"{m}.gate_up_proj_blocks": (e, 2 * i, h // 32, 16),
                            f"{m}.gate_up_proj_scales": (e, 2 * i, h // 32),
                            f"{m}.down_proj_blocks": (e, h, i // 32, 16), f"{m}.down_proj_scales": (e, h, i // 32)})
            else:
                out.update({f"{m}.gate_up_proj": (e, h, 2 * i), f"{m}.down_proj": (e, i, h)})
        return out

    def to_canonical(self, cfg: MoEConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        state = {ours: _take(tensors, theirs) for ours, theirs in self._pairs(cfg)}
        for layer in cfg.moe_layers:
            state.update(self._experts(cfg, layer, tensors))
        if tensors:
            raise MoecError(f"checkpoint has {len(tensors)} tensor(s) the {cfg.architecture} adapter does not "
                            f"understand, e.g. {', '.join(sorted(tensors)[:3])}")
        return state

    def _experts(self, cfg: MoEConfig, layer: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One layer's stacked expert weights ``w1``/``w3`` [E, I, H], ``w2`` [E, H, I] and their biases."""
        m, c = f"model.layers.{layer}.mlp.experts", f"layers.{layer}.mlp"
        e, i, h = cfg.num_experts, cfg.expert_intermediate, cfg.hidden_size
        if f"{m}.gate_up_proj_blocks" in tensors:  # released MXFP4 layout: [E, rows, K] after dequantization
            gate_up = dequantize_mxfp4(_take(tensors, f"{m}.gate_up_proj_blocks"),
                                       _take(tensors, f"{m}.gate_up_proj_scales"), f"{m}.gate_up_proj")
            down = dequantize_mxfp4(_take(tensors, f"{m}.down_proj_blocks"),
                                    _take(tensors, f"{m}.down_proj_scales"), f"{m}.down_proj")
        else:  # transformers' fused layout, x @ W
            gate_up = _take(tensors, f"{m}.gate_up_proj").transpose(1, 2)
            down = _take(tensors, f"{m}.down_proj").transpose(1, 2)
        for name, t, shape in (("gate_up_proj", gate_up, (e, 2 * i, h)), ("down_proj", down, (e, h, i))):
            if tuple(t.shape) != shape:
                raise MoecError(f"checkpoint tensor '{m}.{name}' holds {list(t.shape)} (as [E, out, in]); "
                                f"config.json implies {list(shape)}")
        gate_up_bias, down_bias = _take(tensors, f"{m}.gate_up_proj_bias"), _take(tensors, f"{m}.down_proj_bias")
        if tuple(gate_up_bias.shape) != (e, 2 * i) or tuple(down_bias.shape) != (e, h):
            raise MoecError(f"checkpoint tensors '{m}.*_proj_bias' have shapes {list(gate_up_bias.shape)}, "
                            f"{list(down_bias.shape)}; config.json implies {[e, 2 * i]}, {[e, h]}")
        return {f"{c}.w1": gate_up[:, 0::2].contiguous(), f"{c}.w3": gate_up[:, 1::2].contiguous(),
                f"{c}.w2": down.contiguous(), f"{c}.w1_bias": gate_up_bias[:, 0::2].contiguous(),
                f"{c}.w3_bias": gate_up_bias[:, 1::2].contiguous(), f"{c}.w2_bias": down_bias}

    def to_hf(self, cfg: MoEConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise MoecError(f"saving {cfg.architecture} checkpoints is not supported")
