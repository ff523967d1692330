"""Row-wise prefill kernels for CPUs: softmax over the last axis and SiLU, parallel over rows, vectorised exp.

Relax's legalized ``softmax`` and ``silu`` run on one thread with a libm ``expf`` call per
element (a quarter of a 512-token prefill of the OLMoE-shaped model); these do the same
arithmetic with a polynomial ``exp`` (:func:`fast_exp`, ~1e-7 relative error) on whole vectors.
"""

# No `from __future__ import annotations`: TVMScript needs the evaluated buffer annotations.

from math import gcd

from tvm import tirx
from tvm.script import tirx as T

LN2_HI, LN2_LO = 0.693145751953125, 1.428606765330187e-06  # Cody-Waite split of ln 2
LOG2E = 1.4426950408889634


def fast_exp(x):
    """float32 ``exp(x)`` as a TIR expression that vectorises: ``2**n * exp(r)``, ``r = x - n ln2``
    (``|r| <= ln2 / 2``, degree-7 Taylor), exactly 0 below -87 and clamped at 88."""
    f32 = "float32"
    x = T.min(x, tirx.const(88.0, f32))
    n = T.floor(x * tirx.const(LOG2E, f32) + tirx.const(0.5, f32))
    r = x - n * tirx.const(LN2_HI, f32) - n * tirx.const(LN2_LO, f32)
    p = tirx.const(1.0, f32)
    for d in range(7, 0, -1):
        p = tirx.const(1.0, f32) + r * p * tirx.const(1.0 / d, f32)
    pow2 = T.reinterpret(f32, T.shift_left(T.Cast("int32", n) + 127, 23))
    return T.if_then_else(x < tirx.const(-87.0, f32), tirx.const(0.0, f32), p * pow2)


def fast_silu(x):
    """float32 ``silu(x) = x / (1 + exp(-x))`` as a TIR expression (:func:`fast_exp`): ``row_silu`` and the
    int8 SwiGLU GEMV's epilogue (``schedules/x86_vnni.py``) share it, so fused and unfused agree."""
    return x / (T.float32(1) + fast_exp(T.float32(0) - x))


def softmax_kernel(lead: int, lanes: int = 16, causal: bool = False) -> tirx.PrimFunc:
    """``out[a, t, :] = softmax(x[a, t, :])`` for float32 ``x [lead, T, C]`` (``T``, ``C`` symbolic).

    ``causal``: ``x`` are causal attention scores (``C`` keys, the last ``T`` of them the rows' own): the
    columns past row ``t``'s position ``C - T + t`` hold the mask (-1e30), whose probability is exactly 0;
    whole vectors of them are not read (written 0). The values are those of the plain kernel bit for
    bit (a masked column adds an exact 0 to its lane's sum; the max is over the same valid columns).
    """
    masked = 1 if causal else 0

    @T.prim_func(check_well_formed=False)  # tirx's verifier does not know s_tir blocks
    def row_softmax(x_h: T.handle, out_h: T.handle):
        T.func_attr({"global_symbol": "row_softmax", "tirx.noalias": True})
        rows = T.int32()
        cols = T.int32()
        x = T.match_buffer(x_h, (lead, rows, cols), "float32")
        out = T.match_buffer(out_h, (lead, rows, cols), "float32")
        with T.sblock("root"):  # a block body: Relax's reshape-pattern check needs one
            for task in T.parallel(lead * rows):
                acc = T.alloc_buffer((lanes,), "float32", scope="local")
                a: T.int32 = task // rows
                t: T.int32 = task % rows
                # columns read: all, or those up to the row's position (whole vectors, then the tail)
                stop: T.int32 = T.min(cols - (rows - t - 1) * masked, cols)
                vecs: T.int32 = T.min((stop + lanes - 1) // lanes, cols // lanes)
                tail: T.int32 = T.max(stop, cols // lanes * lanes)
                for lane in T.vectorized(lanes):
                    acc[lane] = T.float32(-3.0e38)
                for c in range(vecs):
                    for lane in T.vectorized(lanes):
                        acc[lane] = T.max(acc[lane], x[a, t, c * lanes + lane])
                for c in range(cols // lanes * lanes, tail):
                    acc[0] = T.max(acc[0], x[a, t, c])
                for lane in range(1, lanes):
                    acc[0] = T.max(acc[0], acc[lane])
                top: T.float32 = acc[0]
                for lane in T.vectorized(lanes):
                    acc[lane] = T.float32(0)
                for c in range(vecs):
                    for lane in T.vectorized(lanes):
                        out[a, t, c * lanes + lane] = fast_exp(x[a, t, c * lanes + lane] - top)
                        acc[lane] = acc[lane] + out[a, t, c * lanes + lane]
                for c in range(cols // lanes * lanes, tail):
                    out[a, t, c] = fast_exp(x[a, t, c] - top)
                    acc[0] = acc[0] + out[a, t, c]
                for lane in range(1, lanes):
                    acc[0] = acc[0] + acc[lane]
                inv: T.float32 = T.float32(1) / acc[0]
                for c in range(vecs):
                    for lane in T.vectorized(lanes):
                        out[a, t, c * lanes + lane] = out[a, t, c * lanes + lane] * inv
                for c in range(cols // lanes * lanes, tail):
                    out[a, t, c] = out[a, t, c] * inv
                for c in range(vecs, cols // lanes):
                    for lane in T.vectorized(lanes):
                        out[a, t, c * lanes + lane] = T.float32(0)
                for c in range(tail, cols):
                    out[a, t, c] = T.float32(0)

    return row_softmax


def silu_kernel(width: int, lanes: int = 16) -> tirx.PrimFunc:
    """``out = x / (1 + exp(-x))`` for float32 ``x [R, width]`` (``R`` symbolic), vectorised over ``width``."""
    vl = lanes if width % lanes == 0 else 1

    @T.prim_func(check_well_formed=False)
    def row_silu(x_h: T.handle, out_h: T.handle):
        T.func_attr({"global_symbol": "row_silu", "tirx.noalias": True})
        rows = T.int32()
        x = T.match_buffer(x_h, (rows, width), "float32")
        out = T.match_buffer(out_h, (rows, width), "float32")
        with T.sblock("root"):
            for r in T.parallel(rows):
                for c in range(width // vl):
                    for lane in T.vectorized(vl):
                        out[r, c * vl + lane] = fast_silu(x[r, c * vl + lane])

    return row_silu


def float_rows_kernel(n: int, block: int = 4, lanes: int = 16) -> tirx.PrimFunc:
    """``out[t] = x[t] @ wt`` for float32 ``x [R, K]`` and ``wt [K, n]`` (a small float weight transposed, e.g.
    a router's), ``R`` and ``K`` symbolic: a task is ``block`` rows, each output vector sums over ``K`` in order
    (the order of a plain matmul reduction), ``wt``'s row loaded once for the block's rows.

    The legalized Relax ``matmul`` this replaces in prefill ran at ~1 GFLOP/s (the reference model's
    router: 0.9 ms of a 512-token prefill per layer).
    """
    vl = gcd(n, lanes)
    chunks = n // vl

    @T.prim_func(check_well_formed=False)
    def float_rows(x_h: T.handle, w_h: T.handle, out_h: T.handle):
        T.func_attr({"global_symbol": "float_rows", "tirx.noalias": True})
        rows = T.int32()
        k = T.int32()
        x = T.match_buffer(x_h, (rows, k), "float32")
        wt = T.match_buffer(w_h, (k, n), "float32")
        out = T.match_buffer(out_h, (rows, n), "float32")
        with T.sblock("root"):
            for task in T.parallel((rows + block - 1) // block):
                acc = T.alloc_buffer((block, n), "float32", scope="local")
                for r in T.unroll(block):
                    for c in T.unroll(chunks):
                        for lane in T.vectorized(vl):
                            acc[r, c * vl + lane] = T.float32(0)
                for i in range(k):
                    for r in T.unroll(block):
                        for c in T.unroll(chunks):
                            for lane in T.vectorized(vl):
                                # tail rows of the last block recompute the last row (never stored)
                                acc[r, c * vl + lane] = acc[r, c * vl + lane] + x[
                                    T.min(task * block + r, rows - 1), i] * wt[i, c * vl + lane]
                for r in T.unroll(block):
                    if task * block + r < rows:
                        for c in T.unroll(chunks):
                            for lane in T.vectorized(vl):
                                out[task * block + r, c * vl + lane] = acc[r, c * vl + lane]

    return float_rows


def rms_norm_kernel(width: int, eps: float, block: int = 8, lanes: int = 16) -> tirx.PrimFunc:
    """RMSNorm of float32 ``x [R, width]`` rows (``R`` symbolic) by ``weight [width]``: the arithmetic of
    :func:`moec.lower.te_ops.rms_norm` bit for bit (each row's sum of squares in order, then
    ``x * w * rsqrt(sum / width + eps)``). The plain loop waits on one add chain per row (~1 ns an
    element): here a task sums ``block`` rows at once, one vector lane per row, from a transposed
    ``[lanes, block]`` tile of the rows (so the sums are vector FMAs, not gathers).
    """
    chunk = gcd(width, lanes)

    @T.prim_func(check_well_formed=False)
    def row_rms_norm(x_h: T.handle, w: T.Buffer((width,), "float32"), out_h: T.handle):
        T.func_attr({"global_symbol": "row_rms_norm", "tirx.noalias": True})
        rows = T.int32()
        x = T.match_buffer(x_h, (rows, width), "float32")
        out = T.match_buffer(out_h, (rows, width), "float32")
        with T.sblock("root"):
            for task in T.parallel((rows + block - 1) // block):
                ss = T.alloc_buffer((block,), "float32", scope="local")
                tile = T.alloc_buffer((chunk, block), "float32", scope="local")
                for r in T.vectorized(block):
                    ss[r] = T.float32(0)
                for c in range(width // chunk):
                    for r in T.unroll(block):
                        for i in T.unroll(chunk):
                            # tail rows of the last block recompute the last row (never stored)
                            tile[i, r] = x[T.min(task * block + r, rows - 1), c * chunk + i]
                    for i in range(chunk):
                        for r in T.vectorized(block):
                            ss[r] = ss[r] + tile[i, r] * tile[i, r]
                for r in range(block):
                    if task * block + r < rows:
                        scale: T.float32 = T.rsqrt(ss[r] / T.float32(float(width)) + T.float32(eps))
                        for c in range(width // chunk):
                            for i in T.vectorized(chunk):
                                out[task * block + r, c * chunk + i] = x[task * block + r, c * chunk + i] * w[
                                    c * chunk + i] * scale

    return row_rms_norm
