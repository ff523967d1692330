"""Tensor-expression pieces of the decode graph: LSB-first dequantization, RoPE, cached attention.

These are the reference (unscheduled) forms; the per-target kernels replace the linear
layers, while RoPE and attention stay small elementwise/reduction ops.
"""

from __future__ import annotations

from tvm import te, tirx

#: The score of a key a query may not see (a finite stand-in for -inf: its softmax weight is exactly 0, and a
#: row's maximum minus it never overflows to nan).
MASKED = -1e30


def _code(p: te.Tensor, lead: tuple, row, i, bits: int, row_bytes: int):
    """Value ``i`` of ``row`` in the LSB-first bit stream (may straddle two bytes)."""
    bit = i * bits
    byte = tirx.floordiv(bit, 8)
    shift = tirx.floormod(bit, 8)
    lo = p[lead + (row, byte)].astype("uint32")
    if 8 % bits == 0:  # 1, 2, 4, 8 bits: never straddles
        return tirx.bitwise_and(tirx.shift_right(lo, shift.astype("uint32")), tirx.const((1 << bits) - 1, "uint32"))
    nxt = tirx.min(byte + 1, row_bytes - 1)
    hi = p[lead + (row, nxt)].astype("uint32")
    word = tirx.bitwise_or(lo, tirx.shift_left(hi, tirx.const(8, "uint32")))
    return tirx.bitwise_and(tirx.shift_right(word, shift.astype("uint32")), tirx.const((1 << bits) - 1, "uint32"))


def dequantize(packed: te.Tensor, scale: te.Tensor, zero: te.Tensor, bits: int, n: int, k: int,
               group: int, super_scale: te.Tensor | None = None, super_groups: int = 0) -> te.Tensor:
    """Float32 ``[..., N, K]`` weights from packed codes ``[..., N, bytes]``, fp16 scales, packed zeros.

    With ``super_scale`` (double-quantized ``u8`` scales) ``scale`` holds uint8 codes and a group's
    scale is ``code · super_scale[..., row, g // super_groups]`` (``moec.quant.double_quant``)."""
    lead_n = len(packed.shape) - 2
    row_bytes = int(packed.shape[-1])
    zero_bytes = int(zero.shape[-1])

    def f(*idx):
        lead, row, i = tuple(idx[:lead_n]), idx[lead_n], idx[lead_n + 1]
        g = tirx.floordiv(i, group)
        q = _code(packed, lead, row, i, bits, row_bytes).astype("float32")
        z = _code(zero, lead, row, g, bits, zero_bytes).astype("float32")
        s = scale[lead + (row, g)].astype("float32")
        if super_scale is not None:
            s = s * super_scale[lead + (row, tirx.floordiv(g, super_groups))].astype("float32")
        return (q - z) * s

    return te.compute(tuple(packed.shape[:-2]) + (n, k), f, name="dequant")


def rope(x: te.Tensor, pos, inv_freq: te.Tensor) -> te.Tensor:
    """Half-rotation RoPE of ``x [heads, head_dim]`` at integer position ``pos`` (``inv_freq [head_dim / 2]``)."""
    hd = int(x.shape[-1])
    half = hd // 2

    def f(h, d):
        ang = pos.astype("float32") * inv_freq[tirx.floormod(d, half)]
        rot = tirx.if_then_else(d < half, -x[h, tirx.min(d + half, hd - 1)], x[h, tirx.max(d - half, 0)])
        return x[h, d] * tirx.cos(ang) + rot * tirx.sin(ang)

    return te.compute(x.shape, f, name="rope")


def float_gemv(x: te.Tensor, weight: te.Tensor) -> te.Tensor:
    """``x [1, K]`` float32 times the float ``weight [N, K]`` (any float dtype, read as float32): ``[1, N]``."""
    k = te.reduce_axis((0, x.shape[1]), name="k")
    return te.compute((x.shape[0], weight.shape[0]),
                      lambda i, n: te.sum(x[i, k] * weight[n, k].astype("float32"), axis=k), name="float_gemv")


def rope_table(start, rows, inv_freq: te.Tensor) -> te.Tensor:
    """``[2, rows, half]``: cos (``[0]``) and sin (``[1]``) of row ``t``'s angles ``(start + t) * inv_freq``
    (the ``ang`` of :func:`rope` / :func:`rope_rows`, computed once per call and shared by every layer)."""
    half = int(inv_freq.shape[0])

    def f(c, t, d):
        ang = (start + t).astype("float32") * inv_freq[d]
        return tirx.if_then_else(c == 0, tirx.cos(ang), tirx.sin(ang))

    return te.compute((2, rows, half), f, name="rope_table")


def rope_apply(x: te.Tensor, table: te.Tensor) -> te.Tensor:
    """Half-rotation RoPE of ``x [heads, head_dim]`` (``table [2, 1, head_dim / 2]``) or ``x [T, heads,
    head_dim]`` (``table [2, T, head_dim / 2]``) with the angles' cos and sin from :func:`rope_table`: the
    arithmetic of :func:`rope` and :func:`rope_rows`."""
    hd = int(x.shape[-1])
    half = hd // 2

    def f(*idx):
        *lead, d = idx
        t = lead[0] if len(lead) == 2 else 0
        j = tirx.floormod(d, half)
        # the partner index is always in bounds: with rope's clamped indices TVM simplified the clamp away
        # in one branch of a static-shape kernel, and the out-of-bounds read there gave garbage
        sign = tirx.if_then_else(d < half, tirx.const(-1.0, "float32"), tirx.const(1.0, "float32"))
        rot = x(*lead, tirx.floormod(d + half, hd)) * sign
        return x(*idx) * table[0, t, j] + rot * table[1, t, j]

    return te.compute(x.shape, f, name="rope")


def attention_scores(q: te.Tensor, keys: te.Tensor) -> te.Tensor:
    """``q [H, hd]`` · ``keys [KVH, P, hd]`` → ``[H, P]`` (grouped KV heads; q pre-scaled)."""
    h_, hd = q.shape
    kvh, p, _ = keys.shape
    rep = int(h_) // int(kvh)
    r = te.reduce_axis((0, hd), name="d")
    return te.compute((h_, p), lambda h, t: te.sum(q[h, r] * keys[h // rep, t, r], axis=r),
                      name="scores")


def attention_values(probs: te.Tensor, values: te.Tensor) -> te.Tensor:
    """``probs [H, P(+1)]`` · ``values [KVH, P, hd]`` → ``[H, hd]`` (a sink column past ``P`` is not read)."""
    h_ = probs.shape[0]
    kvh, p, hd = values.shape
    rep = int(h_) // int(kvh)
    r = te.reduce_axis((0, p), name="t")
    return te.compute((h_, hd), lambda h, d: te.sum(probs[h, r] * values[h // rep, r, d], axis=r), name="attn")


def int8_rows(x: te.Tensor, group: int) -> te.Tensor:
    """``x [T, K]`` as the int8-activation GEMVs see each row: per group of ``group`` columns
    ``sx = max(max|x|, 1e-30) / 127`` and ``x8 = round(x · 127 / max)`` (half to even), back as ``x8 · sx``; a
    float32 GEMM on these rows gives an int8 GEMV's sums up to float rounding."""
    t_, k = x.shape
    r = te.reduce_axis((0, group), name="i")
    amax = te.compute((t_, int(k) // group), lambda t, g: te.max(tirx.abs(x[t, g * group + r]), axis=r),
                      name="amax")

    def top(t, i):
        return tirx.max(amax[t, i // group], tirx.const(1e-30, "float32"))
    return te.compute((t_, k), lambda t, i: tirx.nearbyint(x[t, i] * (tirx.const(127.0, "float32") / top(t, i)))
                      * (top(t, i) / tirx.const(127.0, "float32")), name="int8_rows")


def causal_row_scores(q: te.Tensor, keys: te.Tensor) -> te.Tensor:
    """``q [T, H, hd]`` (pre-scaled) · ``keys [KVH, S, hd]`` → ``[H, T, S]``; row ``t`` sits at position
    ``S - T + t`` and its scores of later keys are :data:`MASKED` (grouped KV heads)."""
    t_, h_, hd = q.shape
    kvh, s_, _ = keys.shape
    rep = int(h_) // int(kvh)
    r = te.reduce_axis((0, hd), name="d")
    raw = te.compute((h_, t_, s_), lambda h, t, s: te.sum(q[t, h, r] * keys[h // rep, s, r], axis=r), name="scores")
    return te.compute((h_, t_, s_), lambda h, t, s: tirx.if_then_else(
        s > s_ - t_ + t, tirx.const(MASKED, "float32"), raw[h, t, s]), name="causal_scores")


def causal_row_values(probs: te.Tensor, values: te.Tensor) -> te.Tensor:
    """``probs [H, T, S(+1)]`` · ``values [KVH, S, vd]`` → ``[T, H, vd]`` (a sink column past ``S`` is not read)."""
    h_, t_ = probs.shape[0], probs.shape[1]
    kvh, s_, vd = values.shape
    rep = int(h_) // int(kvh)
    r = te.reduce_axis((0, s_), name="s")
    return te.compute((t_, h_, vd), lambda t, h, d: te.sum(probs[h, t, r] * values[h // rep, r, d], axis=r),
                      name="attn_rows")


def head_linear(x: te.Tensor, weight: te.Tensor) -> te.Tensor:
    """Per-head projection: ``x [(T,) heads, in]`` · ``weight [heads, out, in]`` → ``[(T,) heads, out]``."""
    heads, out, k = weight.shape
    r = te.reduce_axis((0, k), name="i")
    if len(x.shape) == 2:
        return te.compute((heads, out), lambda h, o: te.sum(x[h, r] * weight[h, o, r], axis=r), name="head_linear")
    return te.compute((x.shape[0], heads, out), lambda t, h, o: te.sum(x[t, h, r] * weight[h, o, r], axis=r),
                      name="head_linear_rows")


def rms_norm(x: te.Tensor, weight: te.Tensor, eps: float) -> te.Tensor:
    """RMSNorm over the last axis of a 2-D ``x`` (a plain reduction + elementwise; cheap to run)."""
    rows, dim = x.shape
    r = te.reduce_axis((0, dim), name="d")
    sq = te.compute((rows,), lambda i: te.sum(x[i, r] * x[i, r], axis=r), name="sumsq")
    return te.compute(x.shape, lambda i, j: x[i, j] * weight[j] * tirx.rsqrt(sq[i] / float(int(dim)) + eps),
                      name="rms_norm")


def layer_norm(x: te.Tensor, weight: te.Tensor, bias: te.Tensor, eps: float) -> te.Tensor:
    """LayerNorm over the last axis of a 2-D ``x``: mean, then the variance of the centred rows."""
    rows, dim = x.shape
    n = float(int(dim))
    r = te.reduce_axis((0, dim), name="d")
    total = te.compute((rows,), lambda i: te.sum(x[i, r], axis=r), name="total")
    r2 = te.reduce_axis((0, dim), name="d2")
    sq = te.compute((rows,), lambda i: te.sum((x[i, r2] - total[i] / n) * (x[i, r2] - total[i] / n), axis=r2),
                    name="centred_sumsq")
    return te.compute(x.shape, lambda i, j: (x[i, j] - total[i] / n) * tirx.rsqrt(sq[i] / n + eps) * weight[j]
                      + bias[j], name="layer_norm")


def rope_rows(x: te.Tensor, start, inv_freq: te.Tensor) -> te.Tensor:
    """RoPE of ``x [T, heads, head_dim]``, row ``t`` at position ``start + t`` (prefill)."""
    hd = int(x.shape[-1])
    half = hd // 2

    def f(t, h, d):
        ang = (start + t).astype("float32") * inv_freq[tirx.floormod(d, half)]
        rot = tirx.if_then_else(d < half, -x[t, h, tirx.min(d + half, hd - 1)], x[t, h, tirx.max(d - half, 0)])
        return x[t, h, d] * tirx.cos(ang) + rot * tirx.sin(ang)

    return te.compute(x.shape, f, name="rope_rows")


def sliding_window(scores: te.Tensor, window: int) -> te.Tensor:
    """Scores ``[H, S]`` (one query at position ``S - 1``) or ``[H, T, S]`` (row ``t`` at ``S - T + t``)
    with every key more than ``window - 1`` positions before its query set to :data:`MASKED`."""
    masked = tirx.const(MASKED, "float32")
    if len(scores.shape) == 2:
        h_, s_ = scores.shape
        return te.compute((h_, s_), lambda h, s: tirx.if_then_else(s + window > s_ - 1, scores[h, s], masked),
                          name="window_scores")
    h_, t_, s_ = scores.shape
    return te.compute((h_, t_, s_), lambda h, t, s: tirx.if_then_else(
        s + window > s_ - t_ + t, scores[h, t, s], masked), name="window_scores")


def last_row(x: te.Tensor) -> te.Tensor:
    """``x [T, D]`` → ``[1, D]``, its last row."""
    return te.compute((1, x.shape[1]), lambda _, j: x[x.shape[0] - 1, j], name="last_row")


def cache_rows(cache: te.Tensor, length) -> te.Tensor:
    """``cache [heads, C, width]`` → its first ``length`` rows ``[heads, length, width]`` (a copy)."""
    return te.compute((cache.shape[0], length, cache.shape[2]), lambda g, t, d: cache[g, t, d], name="cache_rows")
