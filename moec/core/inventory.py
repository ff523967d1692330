"""The model's weight inventory: every 2-D weight by canonical name and shape, and the plan's tensor groups."""

from __future__ import annotations

from moec.core.config import MoEConfig

TENSOR_GROUPS = {
    "attention": r"layers\.\d+\.attn\.(?:[qkvo]|q_a|q_b|kv_a)_proj\.weight",
    "shared_experts": r"layers\.\d+\.mlp\.shared\.w[123]\.weight",
    "shared_gate": r"layers\.\d+\.mlp\.shared_gate\.weight",
    "router": r"layers\.\d+\.mlp\.router\.weight",
    "embeddings": r"embed\.weight",
    "lm_head": r"lm_head\.weight",
    "dense_mlp": r"layers\.\d+\.mlp\.w[123]\.weight",
}


#: Per-head 3-D weights ``[heads, out, in]`` (MLA's absorbed up-projections): kept in float32 like norms.
HEAD_WEIGHTS = ("attn.k_up.weight", "attn.v_up.weight")

#: Routed experts' stacked biases ``[E, out]`` (gpt-oss): float32 like the other biases, not in the plan.
EXPERT_BIASES = ("mlp.w1_bias", "mlp.w3_bias", "mlp.w2_bias")


def non_expert_weights(cfg: MoEConfig) -> list[tuple[str, tuple[int, int]]]:
    """(canonical name, [N, K]) of every 2-D weight that is not a routed expert."""
    h, hd = cfg.hidden_size, cfg.head_dim
    out = [("embed.weight", (cfg.vocab_size, h))]
    for i in range(cfg.num_layers):
        p = f"layers.{i}"
        out += _mla_weights(cfg, p) if cfg.attention == "mla" else [
            (f"{p}.attn.q_proj.weight", (cfg.num_heads * hd, h)), (f"{p}.attn.k_proj.weight", (cfg.num_kv_heads * hd, h)),
            (f"{p}.attn.v_proj.weight", (cfg.num_kv_heads * hd, h)), (f"{p}.attn.o_proj.weight", (h, cfg.num_heads * hd))]
        if i in cfg.dense_layers:
            d = cfg.dense_intermediate
            out += [(f"{p}.mlp.w1.weight", (d, h)), (f"{p}.mlp.w3.weight", (d, h)), (f"{p}.mlp.w2.weight", (h, d))]
            continue
        out.append((f"{p}.mlp.router.weight", (cfg.num_experts, h)))
        if cfg.shared_intermediate:
            s = cfg.shared_intermediate
            out += [(f"{p}.mlp.shared.w1.weight", (s, h)), (f"{p}.mlp.shared.w3.weight", (s, h)),
                    (f"{p}.mlp.shared.w2.weight", (h, s))]
            if cfg.shared_gate:
                out.append((f"{p}.mlp.shared_gate.weight", (1, h)))
    if not cfg.tie_embeddings:
        out.append(("lm_head.weight", (cfg.vocab_size, h)))
    return out


def _mla_weights(cfg: MoEConfig, p: str) -> list[tuple[str, tuple[int, int]]]:
    """The 2-D projections of multi-head latent attention (the absorbed per-head up-projections
    ``k_up``/``v_up`` are 3-D and stay float, like the norms)."""
    h, nh, qd = cfg.hidden_size, cfg.num_heads, cfg.qk_nope_dim + cfg.qk_rope_dim
    q = ([(f"{p}.attn.q_a_proj.weight", (cfg.q_lora_rank, h)), (f"{p}.attn.q_b_proj.weight", (nh * qd, cfg.q_lora_rank))]
         if cfg.q_lora_rank else [(f"{p}.attn.q_proj.weight", (nh * qd, h))])
    return q + [(f"{p}.attn.kv_a_proj.weight", (cfg.kv_lora_rank + cfg.qk_rope_dim, h)),
                (f"{p}.attn.o_proj.weight", (h, nh * cfg.v_head_dim))]


def expert_shapes(cfg: MoEConfig) -> dict[str, tuple[int, int]]:
    """[N, K] of one expert's w1, w3 and w2."""
    h, i = cfg.hidden_size, cfg.expert_intermediate
    return {"w1": (i, h), "w3": (i, h), "w2": (h, i)}


def expert_key(layer: int, expert: int, proj: str) -> str:
    return f"layers.{layer}.mlp.experts.{expert}.{proj}"


def parse_expert_key(name: str) -> tuple[int, int, str]:
    parts = name.split(".")
    return int(parts[1]), int(parts[4]), parts[5]
