"""FamilyAdapter: maps one Hugging Face MoE family's config and tensor names onto MoEConfig/MoEModel."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moec.core.errors import MoecError
from moec.core.config import MoEConfig


def require(hf: dict, *keys: str) -> None:
    """Fail with one clear line when config.json lacks fields this family needs.

    A key written ``a|b`` is satisfied by either name (configs differ across versions).
    """
    missing = [k for k in keys if all(hf.get(a) is None for a in k.split("|"))]
    if missing:
        arch = (hf.get("architectures") or ["?"])[0]
        raise MoecError(f"config.json for {arch} lacks MoE field(s) {', '.join(missing)}; "
                        "is this a Mixture-of-Experts checkpoint?")


def refuse(arch: str, field: str, value, why: str) -> None:
    """One-line error for a config option moec does not handle, naming the field."""
    raise MoecError(f"{arch}: config field {field}={value!r} is not supported ({why})")


def as_float(value):
    """An integer config value as float (``routed_scaling_factor: 1``); anything else unchanged, for
    MoEConfig's type check to judge (no coercion of strings or booleans)."""
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def silu_only(hf: dict) -> None:
    if hf.get("hidden_act", "silu") != "silu":
        refuse(hf["architectures"][0], "hidden_act", hf.get("hidden_act"), "SwiGLU with silu only")


@dataclass(frozen=True)
class FamilyAdapter:
    """Names of one family's tensors. Subclasses implement :meth:`config`.

    ``moe_prefix`` is the MoE block's module name under each layer, ``router`` the
    router's name inside it, ``expert_names`` the (gate, up, down) projection names,
    which moec calls (w1, w3, w2).
    """

    architectures: tuple[str, ...]
    moe_prefix: str = "mlp"
    router: str = "gate"
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    shared_prefix: str = "shared_expert"
    shared_gate: str = "shared_expert_gate"
    dense_prefix: str = "mlp"

    def config(self, hf: dict) -> MoEConfig:
        raise NotImplementedError

    def to_hf_config(self, cfg: MoEConfig) -> dict:
        raise MoecError(f"saving {self.architectures[0]} checkpoints is not supported")

    # -- tensor names ---------------------------------------------------------------
    def _pairs(self, cfg: MoEConfig) -> list[tuple[str, str]]:
        """(canonical name, HF name) for every tensor except the stacked expert weights."""
        pairs = [("embed.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight")]
        if not cfg.tie_embeddings:
            pairs.append(("lm_head.weight", "lm_head.weight"))
        pairs += _bias_pairs(cfg)
        g, u, d = self.expert_names
        for i in range(cfg.num_layers):
            c, h = f"layers.{i}", f"model.layers.{i}"
            pairs += [(f"{c}.attn_norm.weight", f"{h}.input_layernorm.weight"),
                      (f"{c}.mlp_norm.weight", f"{h}.post_attention_layernorm.weight")]
            for p in ("q", "k", "v", "o"):
                pairs.append((f"{c}.attn.{p}_proj.weight", f"{h}.self_attn.{p}_proj.weight"))
                if cfg.attention_bias and p != "o":
                    pairs.append((f"{c}.attn.{p}_proj.bias", f"{h}.self_attn.{p}_proj.bias"))
            if cfg.qk_norm != "none":
                pairs += [(f"{c}.attn.q_norm.weight", f"{h}.self_attn.q_norm.weight"),
                          (f"{c}.attn.k_norm.weight", f"{h}.self_attn.k_norm.weight")]
            if i in cfg.dense_layers:
                for ours, theirs in zip(("w1", "w3", "w2"), (g, u, d)):
                    pairs.append((f"{c}.mlp.{ours}.weight", f"{h}.{self.dense_prefix}.{theirs}.weight"))
                continue
            m = f"{h}.{self.moe_prefix}"
            pairs.append((f"{c}.mlp.router.weight", f"{m}.{self.router}.weight"))
            if cfg.shared_intermediate:
                for ours, theirs in zip(("w1", "w3", "w2"), (g, u, d)):
                    pairs.append((f"{c}.mlp.shared.{ours}.weight", f"{m}.{self.shared_prefix}.{theirs}.weight"))
                if cfg.shared_gate:
                    pairs.append((f"{c}.mlp.shared_gate.weight", f"{m}.{self.shared_gate}.weight"))
        return pairs

    def ignores(self, cfg: MoEConfig, name: str) -> bool:
        """Whether checkpoint tensor ``name`` is not part of the model moec runs (dropped on load)."""
        return False

    def converted_hf_shapes(self, cfg: MoEConfig, present: frozenset[str] = frozenset()) -> dict[str, tuple[int, ...]]:
        """HF tensors that are not renamed but converted on load (split, reordered), with the shapes
        config.json implies (for the layout of the tensor names ``present``); a lazy per-layer reader
        can check them but not convert them."""
        return {}

    def to_canonical(self, cfg: MoEConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """HF tensors (per-expert or fused ``gate_up_proj`` layout) → MoEModel state dict."""
        state = {}
        for ours, theirs in self._pairs(cfg):
            state[ours] = _take(tensors, theirs)
        g, u, d = self.expert_names
        for i in cfg.moe_layers:
            m = f"model.layers.{i}.{self.moe_prefix}.experts"
            if f"{m}.gate_up_proj" in tensors:  # transformers>=5 fused layout [E, 2I, H]
                gate_up = _take(tensors, f"{m}.gate_up_proj")
                state[f"layers.{i}.mlp.w1"], state[f"layers.{i}.mlp.w3"] = gate_up.chunk(2, dim=1)
                state[f"layers.{i}.mlp.w2"] = _take(tensors, f"{m}.down_proj")
                continue
            for ours, theirs in zip(("w1", "w3", "w2"), (g, u, d)):
                parts = [_take(tensors, f"{m}.{e}.{theirs}.weight") for e in range(cfg.num_experts)]
                for e, t in enumerate(parts):
                    if t.shape != parts[0].shape:
                        raise MoecError(f"checkpoint tensor '{m}.{e}.{theirs}.weight' has shape {list(t.shape)}, "
                                        f"expert 0's has {list(parts[0].shape)}; it disagrees with config.json")
                state[f"layers.{i}.mlp.{ours}"] = torch.stack(parts)
        if tensors:
            extra = sorted(tensors)[:3]
            raise MoecError(f"checkpoint has {len(tensors)} tensor(s) the {self.architectures[0]} "
                            f"adapter does not understand, e.g. {', '.join(extra)}")
        return state

    def to_hf_part(self, cfg: MoEConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Part of a MoEModel state dict (canonical names, stacked experts) → its HF tensors, for checkpoints
        written one layer at a time. Families whose :meth:`to_hf` converts tensors refuse in one line."""
        if type(self).to_hf is not FamilyAdapter.to_hf:
            raise MoecError(f"{cfg.architecture} checkpoints cannot be written one layer at a time (tensors are "
                            "converted on save)")
        pairs = dict(self._pairs(cfg))
        hf_expert = dict(zip(("w1", "w3", "w2"), self.expert_names))
        out = {}
        for name, t in state.items():
            parts = name.split(".")
            if len(parts) == 4 and parts[0] == "layers" and parts[2] == "mlp" and parts[3] in hf_expert \
                    and int(parts[1]) in cfg.moe_layers:
                m = f"model.layers.{parts[1]}.{self.moe_prefix}.experts"
                out.update({f"{m}.{e}.{hf_expert[parts[3]]}.weight": t[e] for e in range(cfg.num_experts)})
            elif name in pairs:
                out[pairs[name]] = t
            else:
                raise MoecError(f"tensor '{name}' has no {cfg.architecture} name")
        return {k: v.contiguous() for k, v in out.items()}

    def to_hf(self, cfg: MoEConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """MoEModel state dict → HF tensors in the classic per-expert layout."""
        out = {theirs: state[ours] for ours, theirs in self._pairs(cfg)}
        g, u, d = self.expert_names
        for i in cfg.moe_layers:
            m = f"model.layers.{i}.{self.moe_prefix}.experts"
            for ours, theirs in zip(("w1", "w3", "w2"), (g, u, d)):
                for e in range(cfg.num_experts):
                    out[f"{m}.{e}.{theirs}.weight"] = state[f"layers.{i}.mlp.{ours}"][e]
        return {k: v.contiguous() for k, v in out.items()}


def _bias_pairs(cfg: MoEConfig) -> list[tuple[str, str]]:
    """(canonical, HF) names of LayerNorm, ``o_proj`` and ``lm_head`` biases (Phi-MoE, Granite)."""
    pairs = [("lm_head.bias", "lm_head.bias")] if cfg.lm_head_bias else []
    norms = [("norm", "model.norm")] if cfg.norm == "layer" else []
    for i in range(cfg.num_layers):
        c, h = f"layers.{i}", f"model.layers.{i}"
        if cfg.norm == "layer":
            norms += [(f"{c}.attn_norm", f"{h}.input_layernorm"), (f"{c}.mlp_norm", f"{h}.post_attention_layernorm")]
        if cfg.attention_out_bias:
            pairs.append((f"{c}.attn.o_proj.bias", f"{h}.self_attn.o_proj.bias"))
    return pairs + [(f"{ours}.bias", f"{theirs}.bias") for ours, theirs in norms]


def pick(hf: dict, key: str):
    """Value of the first present alternative in ``key`` (``"num_experts|num_local_experts"``)."""
    for name in key.split("|"):
        if hf.get(name) is not None:
            return hf[name]
    return None


def _take(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in tensors:
        raise MoecError(f"checkpoint is missing tensor '{name}'")
    return tensors.pop(name)


def dense_layers_from_hf(hf: dict, num_layers: int) -> list[int]:
    """Dense layers of Qwen-style configs (``mlp_only_layers`` and ``decoder_sparse_step``)."""
    step = hf.get("decoder_sparse_step") or 1
    only = set(hf.get("mlp_only_layers") or [])
    return [i for i in range(num_layers) if i in only or (i + 1) % step != 0]

