"""Every layer kind of the canonical MoE decoder, written once against :class:`moec.arch.ops.Ops`.

Weight names follow the canonical state dict (``layers.L.attn.q_proj.weight``,
``layers.L.mlp.router.weight`` ...): each block names its weights relative to itself and
enters its sub-blocks with ``ops.block``. A family with a new attention or routing kind adds
one function here and selects it from :func:`decoder_layer` by a config field.
"""

from __future__ import annotations

import math

from moec.arch.ops import Ops, Routing, Value
from moec.core.config import MoEConfig


def norm(ops: Ops, cfg: MoEConfig, x: Value, name: str) -> Value:
    """The layer and final norm: RMSNorm, or LayerNorm with bias (``cfg.norm == "layer"``, Phi-MoE)."""
    return ops.layer_norm(x, name) if cfg.norm == "layer" else ops.rms_norm(x, name)


def partial_rope(ops: Ops, cfg: MoEConfig, x: Value) -> Value:
    """RoPE of the first ``rotary_dim`` dims of each head, the rest passed through (GLM-4.5)."""
    rd, hd = cfg.rope_dim, cfg.head_dim
    if rd == hd:
        return ops.rope(x)
    return ops.concat_last(ops.rope(ops.slice_last(x, 0, rd)), ops.slice_last(x, rd, hd))


def attention(ops: Ops, cfg: MoEConfig, layer: int, x: Value) -> Value:
    """GQA self-attention with optional q/k/v(/o) biases, q/k RMSNorm (over the projection or per head),
    partial rotary, an explicit softmax scale (Granite's ``attention_multiplier``), per-head attention
    sinks and a sliding window on the layers in ``cfg.sliding_layers`` (gpt-oss)."""
    nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q, k, v = (ops.linear(x, f"{n}_proj") for n in "qkv")
    if cfg.qk_norm == "full":
        q, k = ops.rms_norm(q, "q_norm"), ops.rms_norm(k, "k_norm")
    q, k, v = ops.split_heads(q, nh, hd), ops.split_heads(k, nkv, hd), ops.split_heads(v, nkv, hd)
    if cfg.qk_norm == "head":
        q, k = ops.rms_norm(q, "q_norm"), ops.rms_norm(k, "k_norm")
    window = cfg.sliding_window if layer in cfg.sliding_layers else 0
    out = ops.attend(partial_rope(ops, cfg, q), partial_rope(ops, cfg, k), v, layer,
                     cfg.attention_scale or 1.0 / math.sqrt(hd),
                     window=window, sinks="sinks" if cfg.attention_sinks else None)
    return ops.linear(out, "o_proj")


def latent_attention(ops: Ops, cfg: MoEConfig, layer: int, x: Value) -> Value:
    """DeepSeek multi-head latent attention in its absorbed form: the cache holds the latent.

    The keys/values of all heads are up-projections of one normalised latent ``c``
    (``kv_lora_rank`` wide) plus a RoPE'd key part shared by every head. Folding the key
    up-projection into the query (``q_nope · (W_k c) = (W_kᵀ q_nope) · c``) and the value
    up-projection behind the attention makes it single-kv-head attention over ``[c, k_rope]``
    with values ``c``: the cache stores those, and ``k_up``/``v_up`` hold the per-head
    ``W_kᵀ``/``W_v``.
    """
    nh, dn, dr, r = cfg.num_heads, cfg.qk_nope_dim, cfg.qk_rope_dim, cfg.kv_lora_rank
    if cfg.q_lora_rank:
        q = ops.linear(ops.rms_norm(ops.linear(x, "q_a_proj"), "q_a_norm"), "q_b_proj")
    else:
        q = ops.linear(x, "q_proj")
    q = ops.split_heads(q, nh, dn + dr)
    kv = ops.linear(x, "kv_a_proj")
    latent = ops.split_heads(ops.rms_norm(ops.slice_last(kv, 0, r), "kv_norm"), 1, r)
    k = ops.concat_last(latent, ops.rope(ops.split_heads(ops.slice_last(kv, r, r + dr), 1, dr)))
    q = ops.concat_last(ops.head_linear(ops.slice_last(q, 0, dn), "k_up"), ops.rope(ops.slice_last(q, dn, dn + dr)))
    ctx = ops.split_heads(ops.attend(q, k, latent, layer, cfg.attention_scale or 1.0 / math.sqrt(dn + dr)), nh, r)
    return ops.linear(ops.merge_heads(ops.head_linear(ctx, "v_up")), "o_proj")


def swiglu(ops: Ops, cfg: MoEConfig | None, layer: int | None, x: Value) -> Value:
    """``w2(silu(w1 x) * w3 x)``: dense MLP layers and the shared expert (routed experts: :func:`expert`).

    ``cfg`` and ``layer`` are unused (the signature every MLP block shares).
    """
    return ops.linear(ops.mul(ops.silu(ops.linear(x, "w1")), ops.linear(x, "w3")), "w2")


def glu(ops: Ops, cfg: MoEConfig | None, gate: Value, up: Value) -> Value:
    """A routed expert's gated activation: ``silu(gate) * up``, or with ``cfg.swiglu_limit`` gpt-oss's
    clamped form ``(clamp(up, ±limit) + 1) · g · sigmoid(alpha · g)``, ``g = min(gate, limit)``."""
    if cfg is None or not cfg.swiglu_limit:
        return ops.mul(ops.silu(gate), up)
    limit = cfg.swiglu_limit
    gate, up = ops.clamp(gate, None, limit), ops.clamp(up, -limit, limit)
    g = ops.mul(gate, ops.sigmoid(ops.scale(gate, cfg.swiglu_alpha)))
    return ops.add(ops.mul(g, up), g)  # g · (up + 1)


def expert(ops: Ops, cfg: MoEConfig, layer: int | None, x: Value) -> Value:
    """One routed expert ``w2(glu(w1 x, w3 x))`` with the projections' biases if the family has them
    (backends whose dispatch calls expert kernels directly apply :func:`glu` between them)."""
    return ops.linear(glu(ops, cfg, ops.linear(x, "w1"), ops.linear(x, "w3")), "w2")


def router(ops: Ops, cfg: MoEConfig, layer: int, x: Value) -> Routing:
    """Softmax or sigmoid scores, top-k (on the scores plus ``score_bias`` if the family biases the
    choice, within the best expert groups if routing is group-limited; the gates stay the scores),
    renormalised to sum 1 if the family does, times ``routed_scale``; Phi-MoE's sparsemixer; or
    gpt-oss's softmax over the top-k logits (``router_scoring == "topk_softmax"``). Experts the plan
    dropped from ``layer`` get ``-inf`` logits first (:meth:`Ops.mask_experts`)."""
    logits = ops.mask_experts(ops.linear(x, "router"), layer)  # plus its bias, if the family has one
    if cfg.router_scoring == "sparsemixer":
        return sparsemixer(ops, cfg, logits)
    if cfg.router_scoring == "topk_softmax":  # gpt-oss: the top-k logits, softmax over those k
        top, ids = ops.topk(logits, cfg.top_k)
        return Routing(ops.softmax(logits), ops.softmax(top), ids)
    probs = ops.sigmoid(logits) if cfg.router_scoring == "sigmoid" else ops.softmax(logits)
    grouped = cfg.kept_groups < cfg.expert_groups
    if cfg.router_bias or grouped:
        choice = ops.add_bias(probs, "score_bias") if cfg.router_bias else probs
        if grouped:
            choice = ops.keep_top_groups(choice, cfg.expert_groups, cfg.kept_groups, cfg.group_score_top)
        _, ids = ops.topk(choice, cfg.top_k)
        weights = ops.gather_last(probs, ids)
    else:
        weights, ids = ops.topk(probs, cfg.top_k)
    if cfg.norm_topk_prob:
        weights = ops.div(weights, ops.sum_last(weights))
    if cfg.routed_scale != 1.0:
        weights = ops.scale(weights, cfg.routed_scale)
    return Routing(probs, weights, ids)


def sparsemixer(ops: Ops, cfg: MoEConfig, logits: Value) -> Routing:
    """Phi-MoE's sparsemixer top-2 at inference, as transformers computes it.

    Slot 1 is the best expert; its gate is its softmax weight among the experts whose logit is
    within ``2 * eps`` (relative: ``(max - l) / max(|l|, max)``) of the best. Slot 2 is the second
    best; its gate is its softmax weight among the experts within ``2 * eps`` of it, the first
    excluded. The gates are not renormalised.
    """
    eps = cfg.sparsemixer_eps
    best, ids = ops.topk(logits, 2)
    first, second = ops.slice_last(ids, 0, 1), ops.slice_last(ids, 1, 2)
    g1 = ops.gather_last(ops.softmax(ops.jitter_mask(logits, ops.slice_last(best, 0, 1), eps)), first)
    near = ops.mask_ids(ops.jitter_mask(logits, ops.slice_last(best, 1, 2), eps), first)
    g2 = ops.gather_last(ops.softmax(near), second)
    return Routing(ops.softmax(logits), ops.concat_last(g1, g2), ids)


def moe(ops: Ops, cfg: MoEConfig, layer: int, x: Value) -> Value:
    """Routed experts plus the optional shared expert (with its sigmoid gate)."""
    y = ops.routed_experts(x, router(ops, cfg, layer, x), layer)
    if cfg.shared_intermediate:
        s = ops.block("shared", swiglu, cfg, layer, x)
        if cfg.shared_gate:
            s = ops.mul(ops.sigmoid(ops.linear(x, "shared_gate")), s)
        y = ops.add(y, s)
    return y


def decoder_layer(ops: Ops, cfg: MoEConfig, layer: int, x: Value) -> Value:
    """Pre-norm residual layer: attention, then the MoE block (or a dense SwiGLU layer); each block's
    output times ``residual_scale`` (Granite) before its residual add."""
    attn = latent_attention if cfg.attention == "mla" else attention
    a = ops.block("attn", attn, cfg, layer, norm(ops, cfg, x, "attn_norm"))
    x = ops.add(x, _scaled(ops, a, cfg.residual_scale))
    mlp = swiglu if layer in cfg.dense_layers else moe
    m = ops.block("mlp", mlp, cfg, layer, norm(ops, cfg, x, "mlp_norm"))
    return ops.add(x, _scaled(ops, m, cfg.residual_scale))


def _scaled(ops: Ops, x: Value, factor: float) -> Value:
    return x if factor == 1.0 else ops.scale(x, factor)


def causal_lm(ops: Ops, cfg: MoEConfig, ids: Value) -> Value:
    """Embedding, the decoder layers, final norm and the (possibly tied) LM head: the logits
    (embeddings and logits scaled by ``embedding_scale`` / ``logits_scale``, Granite)."""
    x = _scaled(ops, ops.embed(ids, "embed"), cfg.embedding_scale)
    for i in range(cfg.num_layers):
        x = ops.block(f"layers.{i}", decoder_layer, cfg, i, x)
    h = norm(ops, cfg, ops.output_rows(x), "norm")
    return _scaled(ops, ops.linear(h, "embed" if cfg.tie_embeddings else "lm_head"), cfg.logits_scale)
