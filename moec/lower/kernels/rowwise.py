"""Row-wise prefill kernels for CPUs: softmax over the last axis and SiLU, parallel over rows, vectorised exp.

Relax's legalized ``softmax`` and ``silu`` run on one thread with a libm ``expf`` call per
element (a quarter of a 512-token prefill of the OLMoE-shaped model); these do the same
arithmetic with a polynomial ``exp`` (:func:`fast_exp`, ~1e-7 relative error) on whole vectors.
"""

# No `from __future__ import annotations`: TVMScript needs the evaluated buffer annotations.

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


def softmax_kernel(lead: int, lanes: int = 16) -> tirx.PrimFunc:
    """``out[a, t, :] = softmax(x[a, t, :])`` for float32 ``x [lead, T, C]`` (``T``, ``C`` symbolic)."""

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
                for lane in T.vectorized(lanes):
                    acc[lane] = T.float32(-3.0e38)
                for c in range(cols // lanes):
                    for lane in T.vectorized(lanes):
                        acc[lane] = T.max(acc[lane], x[a, t, c * lanes + lane])
                for c in range(cols // lanes * lanes, cols):
                    acc[0] = T.max(acc[0], x[a, t, c])
                for lane in range(1, lanes):
                    acc[0] = T.max(acc[0], acc[lane])
                top: T.float32 = acc[0]
                for lane in T.vectorized(lanes):
                    acc[lane] = T.float32(0)
                for c in range(cols // lanes):
                    for lane in T.vectorized(lanes):
                        out[a, t, c * lanes + lane] = fast_exp(x[a, t, c * lanes + lane] - top)
                        acc[lane] = acc[lane] + out[a, t, c * lanes + lane]
                for c in range(cols // lanes * lanes, cols):
                    out[a, t, c] = fast_exp(x[a, t, c] - top)
                    acc[0] = acc[0] + out[a, t, c]
                for lane in range(1, lanes):
                    acc[0] = acc[0] + acc[lane]
                inv: T.float32 = T.float32(1) / acc[0]
                for c in range(cols // lanes):
                    for lane in T.vectorized(lanes):
                        out[a, t, c * lanes + lane] = out[a, t, c * lanes + lane] * inv
                for c in range(cols // lanes * lanes, cols):
                    out[a, t, c] = out[a, t, c] * inv

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
                        out[r, c * vl + lane] = x[r, c * vl + lane] / (
                            T.float32(1) + fast_exp(T.float32(0) - x[r, c * vl + lane]))

    return row_silu
