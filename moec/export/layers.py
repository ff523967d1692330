"""ONNX nodes for the dense parts of a decoder layer: RMSNorm, RoPE, GQA attention with a KV cache, SwiGLU.

Activations are float32 ``[T, H]`` (batch 1 flattened); the KV cache is ``[1, kv_heads, P, head_dim]``.
Every construction mirrors ``moec.models.model`` operation for operation, so onnxruntime and torch
differ only by float32 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moec.export.onnx_graph import GraphBuilder
from moec.export.quantized_matmul import StoredWeight, linear
from moec.core.config import MoEConfig


@dataclass
class Positions:
    """Per-graph position values shared by every layer."""

    past: str            # int64 scalar: cached length P
    total: str           # int64 scalar: P + T
    cos: str             # float [T, 1, head_dim]
    sin: str
    mask: str | None     # float [T, P + T] additive causal mask, None for single-token decode


def rms_norm(gb: GraphBuilder, x: str, weight: str, eps: float) -> str:
    """``weight * (x / sqrt(mean(x**2, -1) + eps))`` over the last axis."""
    ms = gb.op("ReduceMean", [gb.op("Mul", [x, x]), gb.i64(-1)], keepdims=1)
    inv = gb.op("Reciprocal", [gb.op("Sqrt", [gb.op("Add", [ms, gb.f32(eps)])])])
    return gb.op("Mul", [weight, gb.op("Mul", [x, inv])])


def positions(gb: GraphBuilder, cfg: MoEConfig, seq_len: str, past: str | None, causal: bool) -> Positions:
    """RoPE tables for positions ``P .. P+T-1`` and (if ``causal``) the additive attention mask.

    ``seq_len`` and ``past`` are int64 scalars (``past`` None means 0). The inverse frequencies
    are computed with torch exactly as ``moec.models.model.rope_tables`` does.
    """
    past = past or gb.scalar_i64(0)
    total = gb.op("Add", [past, seq_len])
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
    pos = gb.op("Cast", [gb.op("Range", [past, total, gb.scalar_i64(1)])], to=1)
    freqs = gb.op("Mul", [gb.op("Unsqueeze", [pos, gb.i64(1)]), gb.const(inv_freq.numpy()[None, :])])
    emb = gb.op("Concat", [freqs, freqs], axis=-1)
    cos = gb.op("Unsqueeze", [gb.op("Cos", [emb]), gb.i64(1)])
    sin = gb.op("Unsqueeze", [gb.op("Sin", [emb]), gb.i64(1)])
    mask = None
    if causal:  # query i (absolute P+i) sees keys j <= P+i
        keys = gb.op("Unsqueeze", [gb.op("Range", [gb.scalar_i64(0), total, gb.scalar_i64(1)]), gb.i64(0)])
        queries = gb.op("Unsqueeze", [gb.op("Range", [past, total, gb.scalar_i64(1)]), gb.i64(1)])
        mask = gb.op("Where", [gb.op("LessOrEqual", [keys, queries]), gb.f32(0.0), gb.f32(-np.inf)])
    return Positions(past, total, cos, sin, mask)


def apply_rope(gb: GraphBuilder, x: str, pos: Positions, head_dim: int) -> str:
    """``x * cos + rotate_half(x) * sin`` on ``x [T, heads, head_dim]``."""
    half = head_dim // 2
    lo = gb.op("Slice", [x, gb.i64(0), gb.i64(half), gb.i64(-1)])
    hi = gb.op("Slice", [x, gb.i64(half), gb.i64(head_dim), gb.i64(-1)])
    rotated = gb.op("Concat", [gb.op("Neg", [hi]), lo], axis=-1)
    return gb.op("Add", [gb.op("Mul", [x, pos.cos]), gb.op("Mul", [rotated, pos.sin])])


def attention(gb: GraphBuilder, cfg: MoEConfig, layer: int, x: str, w: dict[str, StoredWeight],
              floats: dict[str, str], pos: Positions, past_kv: tuple[str, str] | None,
              present_names: tuple[str, str]) -> str:
    """Self-attention of layer ``layer`` on ``x [T, H]``; writes ``present_names`` ([1, kv, P+T, hd])."""
    p = f"layers.{layer}.attn"
    nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q, k, v = (linear(gb, x, w[f"{p}.{n}_proj.weight"], floats.get(f"{p}.{n}_proj.bias")) for n in "qkv")
    if cfg.qk_norm == "full":
        q = rms_norm(gb, q, floats[f"{p}.q_norm.weight"], cfg.rms_eps)
        k = rms_norm(gb, k, floats[f"{p}.k_norm.weight"], cfg.rms_eps)
    q = gb.op("Reshape", [q, gb.i64(-1, nh, hd)])
    k = gb.op("Reshape", [k, gb.i64(-1, nkv, hd)])
    v = gb.op("Reshape", [v, gb.i64(-1, nkv, hd)])
    if cfg.qk_norm == "head":
        q = rms_norm(gb, q, floats[f"{p}.q_norm.weight"], cfg.rms_eps)
        k = rms_norm(gb, k, floats[f"{p}.k_norm.weight"], cfg.rms_eps)
    q, k = apply_rope(gb, q, pos, hd), apply_rope(gb, k, pos, hd)
    # [T, heads, hd] -> [1, heads, T, hd]: the cache layout
    k = gb.op("Transpose", [k], perm=[1, 0, 2])
    v = gb.op("Transpose", [v], perm=[1, 0, 2])
    k, v = gb.op("Unsqueeze", [k, gb.i64(0)]), gb.op("Unsqueeze", [v, gb.i64(0)])
    if past_kv is not None:
        k = gb.op("Concat", [past_kv[0], k], axis=2)
        v = gb.op("Concat", [past_kv[1], v], axis=2)
    gb.op("Identity", [k], outputs=[present_names[0]])
    gb.op("Identity", [v], outputs=[present_names[1]])
    # GQA without copies: query head h = kv * rep + r uses kv head h // rep (repeat_interleave)
    rep = nh // nkv
    qh = gb.op("Reshape", [gb.op("Transpose", [q], perm=[1, 0, 2]), gb.i64(nkv, rep, -1, hd)])
    kh = gb.op("Reshape", [k, gb.i64(nkv, 1, -1, hd)])
    vh = gb.op("Reshape", [v, gb.i64(nkv, 1, -1, hd)])
    scores = gb.op("MatMul", [qh, gb.op("Transpose", [kh], perm=[0, 1, 3, 2])])
    scores = gb.op("Mul", [scores, gb.f32(1.0 / np.sqrt(hd))])
    if pos.mask is not None:
        scores = gb.op("Add", [scores, pos.mask])
    ctx = gb.op("MatMul", [gb.op("Softmax", [scores], axis=-1), vh])        # [nkv, rep, T, hd]
    ctx = gb.op("Transpose", [gb.op("Reshape", [ctx, gb.i64(nh, -1, hd)])], perm=[1, 0, 2])
    ctx = gb.op("Reshape", [ctx, gb.i64(-1, nh * hd)])
    return linear(gb, ctx, w[f"{p}.o_proj.weight"])


def swiglu(gb: GraphBuilder, x: str, w1: StoredWeight, w3: StoredWeight, w2: StoredWeight) -> str:
    """``w2(silu(w1 x) * w3 x)``."""
    a = linear(gb, x, w1)
    h = gb.op("Mul", [gb.op("Mul", [a, gb.op("Sigmoid", [a])]), linear(gb, x, w3)])
    return linear(gb, h, w2)
