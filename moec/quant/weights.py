"""ModelWeights: every tensor an export needs (packed 2-D weights under a plan, float32 1-D tensors)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moec.core.config import MoEConfig
from moec.models.model import MoEModel
from moec.quant.pack import pack, packed_row_bytes
from moec.core.inventory import EXPERT_BIASES, HEAD_WEIGHTS, expert_key, expert_shapes, non_expert_weights
from moec.quant.cache import QuantCache
from moec.quant.packed_model import PackedWeight, pack_model
from moec.core.plan import BitPlan


@dataclass
class ModelWeights:
    """Packed weights keyed by canonical name (experts ``layers.L.mlp.experts.E.w1|w3|w2``) + 1-D floats."""

    cfg: MoEConfig
    plan: BitPlan
    packed: dict[str, PackedWeight]
    floats: dict[str, np.ndarray]

    @classmethod
    def from_model(cls, model: MoEModel, plan: BitPlan, cache: QuantCache | None = None) -> "ModelWeights":
        """Quantize and pack ``model`` under ``plan`` (the same arrays ``fake_quantize_model`` dequantizes);
        ``cache`` (a :class:`~moec.quant.cache.QuantCache`) skips weights quantized the same way before."""
        return cls(model.cfg, plan, pack_model(model, plan, cache=cache), _floats(model))

    @classmethod
    def float32_from_model(cls, model: MoEModel, plan: BitPlan) -> "ModelWeights":
        """Unquantized float32 weights (FP32 baselines); ``plan`` only supplies the metadata."""
        state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
        packed = {n: _float32(state[n]) for n, _ in non_expert_weights(model.cfg)}
        for layer in model.cfg.moe_layers:
            for e in range(model.cfg.num_experts):
                if not plan.is_stored(layer, e):
                    continue
                for p in ("w1", "w3", "w2"):
                    packed[expert_key(layer, e, p)] = _float32(state[f"layers.{layer}.mlp.{p}"][e])
        return cls(model.cfg, plan, packed, _floats(model))


def _float32(w: np.ndarray) -> PackedWeight:
    return PackedWeight(w.shape, 16, 0, np.ascontiguousarray(w, dtype=np.float32))


def _floats(model: MoEModel) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()
            if v.dim() == 1 or k.endswith(HEAD_WEIGHTS + EXPERT_BIASES)}


def random_weights(cfg: MoEConfig, plan: BitPlan, seed: int = 0, float32: bool = False) -> ModelWeights:
    """Random weights already in packed form (no float copy): for benchmarks of models too big to quantize.

    Codes and zeros are random bytes, scales small random fp16; the router and other float weights
    are random normal, so routing varies from token to token like a trained model's. With
    ``float32`` every weight is float32 (the FP32 baseline of the same model).
    """
    rng = np.random.default_rng(seed)
    pool: dict[tuple[int, int], list[np.ndarray]] = {}

    def random_float(name: str, n: int, k: int) -> np.ndarray:
        def fresh() -> np.ndarray:
            return rng.standard_normal((n, k), dtype=np.float32) * np.float32(1 / np.sqrt(k))

        if ".experts." not in name:
            return fresh()
        # float experts cycle through 4 matrices per shape: making gigabytes of normals is slow, and
        # latency does not depend on the values (routing comes from the fresh router weights)
        mats = pool.setdefault((n, k), [])
        if len(mats) < 4:
            mats.append(fresh())
            return mats[-1]
        return mats[len(packed) % 4]

    items = [(n, s, plan.tensor_bits(n)) for n, s in non_expert_weights(cfg)]
    for layer, experts in plan.experts.items():
        for e, bits in experts.items():
            if plan.is_stored(layer, e):
                items += [(expert_key(layer, e, p), s, bits) for p, s in expert_shapes(cfg).items()]
    packed = {}
    for name, (n, k), bits in items:
        if float32 or bits == 16:
            w = random_float(name, n, k)
            packed[name] = _float32(w) if float32 else PackedWeight((n, k), 16, plan.group_size, w.astype(np.float16))
            continue
        g = k // plan.group_size
        codes = rng.integers(0, 256, (n, packed_row_bytes(k, bits)), dtype=np.uint8)
        if (k * bits) % 8:
            codes[:, -1] &= (1 << ((k * bits) % 8)) - 1  # unused high bits stay 0, as pack() writes them
        zeros = pack(rng.integers(0, 1 << bits, (n, g), dtype=np.uint8), bits)
        scale = (rng.random((n, g), dtype=np.float32) * 0.02 / (1 << bits) + 1e-4).astype(np.float16)
        packed[name] = PackedWeight((n, k), bits, plan.group_size, codes, scale, zeros)
    floats = {}
    h, hd = cfg.hidden_size, cfg.head_dim
    floats["norm.weight"] = np.ones(h, np.float32)
    for i in range(cfg.num_layers):
        floats[f"layers.{i}.attn_norm.weight"] = np.ones(h, np.float32)
        floats[f"layers.{i}.mlp_norm.weight"] = np.ones(h, np.float32)
        if cfg.qk_norm != "none":
            qn, kn = (cfg.num_heads * hd, cfg.num_kv_heads * hd) if cfg.qk_norm == "full" else (hd, hd)
            floats[f"layers.{i}.attn.q_norm.weight"] = np.ones(qn, np.float32)
            floats[f"layers.{i}.attn.k_norm.weight"] = np.ones(kn, np.float32)
        if cfg.attention_bias:
            for p, width in (("q", cfg.num_heads * hd), ("k", cfg.num_kv_heads * hd), ("v", cfg.num_kv_heads * hd)):
                floats[f"layers.{i}.attn.{p}_proj.bias"] = np.zeros(width, np.float32)
        if cfg.attention == "mla":
            floats.update(_mla_floats(cfg, i, rng))
        if cfg.router_bias and i not in cfg.dense_layers:
            floats[f"layers.{i}.mlp.score_bias"] = (rng.standard_normal(cfg.num_experts) * 0.01).astype(np.float32)
        floats.update(_gptoss_floats(cfg, i, rng))
        if cfg.attention_out_bias:
            floats[f"layers.{i}.attn.o_proj.bias"] = np.zeros(h, np.float32)
    if cfg.norm == "layer":  # LayerNorm biases
        norms = [n for n in floats if n.endswith("norm.weight") and ".attn." not in n]
        floats.update({n.replace(".weight", ".bias"): np.zeros(h, np.float32) for n in norms})
    if cfg.lm_head_bias:
        floats["lm_head.bias"] = np.zeros(cfg.vocab_size, np.float32)
    return ModelWeights(cfg, plan, packed, floats)


def _gptoss_floats(cfg: MoEConfig, layer: int, rng) -> dict[str, np.ndarray]:
    """Sinks, the router's and experts' biases (those the config has) for random weights."""
    p, out = f"layers.{layer}", {}

    def small(*shape):
        return (rng.standard_normal(shape) * 0.01).astype(np.float32)

    if cfg.attention_sinks:
        out[f"{p}.attn.sinks"] = small(cfg.num_heads)
    if layer in cfg.moe_layers and cfg.router_logit_bias:
        out[f"{p}.mlp.router.bias"] = small(cfg.num_experts)
    if layer in cfg.moe_layers and cfg.expert_bias:
        e, i = cfg.num_experts, cfg.expert_intermediate
        out.update({f"{p}.mlp.w1_bias": small(e, i), f"{p}.mlp.w3_bias": small(e, i),
                    f"{p}.mlp.w2_bias": small(e, cfg.hidden_size)})
    return out


def _mla_floats(cfg: MoEConfig, layer: int, rng) -> dict[str, np.ndarray]:
    """Latent attention's norms and absorbed per-head up-projections (float32) for random weights."""
    p, nh, r = f"layers.{layer}.attn", cfg.num_heads, cfg.kv_lora_rank
    out = {f"{p}.kv_norm.weight": np.ones(r, np.float32),
           f"{p}.k_up.weight": (rng.standard_normal((nh, r, cfg.qk_nope_dim)) * 0.02).astype(np.float32),
           f"{p}.v_up.weight": (rng.standard_normal((nh, cfg.v_head_dim, r)) * 0.02).astype(np.float32)}
    if cfg.q_lora_rank:
        out[f"{p}.q_a_norm.weight"] = np.ones(cfg.q_lora_rank, np.float32)
    return out
