"""One decode token's cache write and attention as a single CPU kernel (explicit TIR, plain vector loops).

Replaces the cache write and the scores / softmax / values chain of the decode graph (four to six
kernels per layer, each re-reading the cache through a generic schedule) when the layer has no
sliding window and no attention sinks. The cache has a fixed capacity and is written in place
(``call_tir_inplace``): per kv head the token's key and value go to row ``pos``, then per query
head ``h`` of that kv head, over rows ``0..pos``:

    s[t]   = scale * q[h] . keys[kv, t]          (a 16-lane vector dot per position)
    p[t]   = exp(s[t] - max s)                   (exp as TVM's ``fast_exp``: a degree-7 polynomial
                                                  and an exponent built from bits, within 3 ulp)
    out[h] = sum_t p[t] * values[kv, t] / sum p  (vectorised over the value width)

Heads run in parallel; the capacity and ``pos`` are symbolic, so one kernel serves every step.
No target intrinsics: x86 and ARM compile the same TIR (LLVM picks the vector width).
"""

# No `from __future__ import annotations`: TVMScript needs the evaluated buffer annotations.

from math import gcd

from tvm import tirx
from tvm.script import tirx as T

from moec.core.errors import MoecError
from moec.lower.kernels.scopes import stack_scope

_LANES = 16
# TVM's fast_exp (topi/elemwise.h, fast_exp_float32): Cephes' expf polynomial
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
             5.0000001201e-1)


def fast_exp(x):
    """float32 ``exp(x)`` as TVM's ``topi.fast_exp`` computes it, as a PrimExpr of ``x``."""
    f32 = lambda v: tirx.const(v, "float32")  # noqa: E731
    xc = tirx.max(tirx.min(x, f32(88.3762626647950)), f32(-88.3762626647949))
    n = tirx.floor(xc * f32(1.44269504088896341) + f32(0.5))
    f = xc - n * f32(0.6931471805599453)
    y = f32(_EXP_POLY[0])
    for c in _EXP_POLY[1:]:
        y = y * f + f32(c)
    y = y * f * f + f + f32(1.0)
    two_n = tirx.reinterpret("float32", tirx.shift_left((n + f32(127.0)).astype("int32"), tirx.const(23, "int32")))
    return tirx.max(two_n * y, x)


def decode_attention(heads: int, kv_heads: int, head_dim: int, value_dim: int, scale: float) -> tirx.PrimFunc:
    """``attention(q [heads, head_dim], k [kv_heads, 1, head_dim], v [kv_heads, 1, value_dim],
    keys [kv_heads, C, head_dim], values [kv_heads, C, value_dim], pos, out [heads, value_dim])`` with the
    capacity ``C`` and ``pos`` symbolic: writes ``k``/``v`` into row ``pos`` of the caches ``keys``/``values``
    in place and attends over rows ``0..pos``."""
    if heads < 1 or kv_heads < 1 or heads % kv_heads or head_dim < 1 or value_dim < 1:
        raise MoecError(f"decode attention needs heads ({heads}) a multiple of kv_heads ({kv_heads}) "
                        f"and positive widths (head {head_dim}, value {value_dim})")
    rep = heads // kv_heads
    ql, vl = gcd(head_dim, _LANES), gcd(value_dim, _LANES)
    qc, vc = head_dim // ql, value_dim // vl
    sc = float(scale)

    @T.macro
    def halve(acc, width):
        for lane in T.vectorized(width):
            acc[lane] = acc[lane] + acc[lane + width]

    @T.prim_func
    def attention(q_h: T.handle, k_h: T.handle, v_h: T.handle, keys_h: T.handle, values_h: T.handle, p: T.int64,
                  o_h: T.handle):
        T.func_attr({"global_symbol": "decode_attention", "tirx.noalias": True, "tirx.is_scheduled": True})
        cap = T.int64()
        q = T.match_buffer(q_h, (heads, head_dim), "float32")
        new_k = T.match_buffer(k_h, (kv_heads, 1, head_dim), "float32")
        new_v = T.match_buffer(v_h, (kv_heads, 1, value_dim), "float32")
        keys = T.match_buffer(keys_h, (kv_heads, cap, head_dim), "float32")
        values = T.match_buffer(values_h, (kv_heads, cap, value_dim), "float32")
        out = T.match_buffer(o_h, (heads, value_dim), "float32")
        for g in T.parallel(kv_heads):
            for c in range(qc):  # the token's key and value, written in place at row p
                for lane in T.vectorized(ql):
                    keys[g, p, c * ql + lane] = new_k[g, 0, c * ql + lane]
            for c in range(vc):
                for lane in T.vectorized(vl):
                    values[g, p, c * vl + lane] = new_v[g, 0, c * vl + lane]
            for r in range(rep):
                score = T.alloc_buffer((p + 1,), "float32")
                # register tiles on the stack when they fit (kernels/scopes.py), not a workspace per head
                acc = T.alloc_buffer((_LANES,), "float32", scope=stack_scope(4 * _LANES))
                vec = T.alloc_buffer((2, _LANES), "float32", scope=stack_scope(8 * _LANES))  # lane max, sum of exps
                oacc = T.alloc_buffer((value_dim,), "float32", scope=stack_scope(4 * value_dim))
                for t in range(p + 1):
                    for lane in T.vectorized(_LANES):
                        acc[lane] = T.float32(0)
                    for c in range(qc):
                        for lane in T.vectorized(ql):
                            acc[lane] = acc[lane] + q[g * rep + r, c * ql + lane] * keys[g, t, c * ql + lane]
                    halve(acc, 8)  # tree sum of the 16 lanes (lanes past ql stay 0): four vector adds
                    halve(acc, 4)
                    halve(acc, 2)
                    halve(acc, 1)
                    score[t] = acc[0] * T.float32(sc)
                for lane in T.vectorized(_LANES):
                    vec[0, lane] = T.float32(-3.0e38)
                    vec[1, lane] = T.float32(0)
                for b in range((p + 1) // _LANES):
                    for lane in T.vectorized(_LANES):
                        vec[0, lane] = T.max(vec[0, lane], score[b * _LANES + lane])
                for t in range((p + 1) // _LANES * _LANES, p + 1):
                    vec[0, 0] = T.max(vec[0, 0], score[t])
                for lane in range(1, _LANES):
                    vec[0, 0] = T.max(vec[0, 0], vec[0, lane])
                for b in range((p + 1) // _LANES):
                    for lane in T.vectorized(_LANES):
                        score[b * _LANES + lane] = fast_exp(score[b * _LANES + lane] - vec[0, 0])
                        vec[1, lane] = vec[1, lane] + score[b * _LANES + lane]
                for t in range((p + 1) // _LANES * _LANES, p + 1):
                    score[t] = fast_exp(score[t] - vec[0, 0])
                    vec[1, 0] = vec[1, 0] + score[t]
                for lane in range(1, _LANES):
                    vec[1, 0] = vec[1, 0] + vec[1, lane]
                for c in range(vc):
                    for lane in T.vectorized(vl):
                        oacc[c * vl + lane] = T.float32(0)
                for t in range(p + 1):
                    for c in range(vc):
                        for lane in T.vectorized(vl):
                            oacc[c * vl + lane] = oacc[c * vl + lane] + score[t] * values[g, t, c * vl + lane]
                for c in range(vc):
                    for lane in T.vectorized(vl):
                        out[g * rep + r, c * vl + lane] = oacc[c * vl + lane] / vec[1, 0]

    return attention
