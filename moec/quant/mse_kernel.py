"""The ``mse`` clipping search as one compiled (TVM, LLVM) kernel, bit-identical to the numpy form.

:func:`moec.quant.methods.mse_params` evaluates every shrink factor with a dozen whole-array numpy
passes; this kernel does the same float32 arithmetic for one group at a time in registers
(20 candidates × ``group_size`` weights without leaving the L1 cache), so the search is no
longer the slow stage of a compile. It reproduces numpy exactly:

- the candidate's scale is ``ceil_fp16((p·hi − p·lo) / maxq)`` (float32 division, round to
  float16 to nearest, one float16 step up when that fell below) and its zero
  ``clamp(rint(−p·lo / scale), 0, maxq)`` — :func:`moec.quant.affine.affine_params`;
- each weight's error is ``(w − clamp(rint(w / scale), −zero, maxq − zero) · scale)² · importance``
  — :func:`moec.quant.affine.group_sq_error`, operation by operation;
- the group's sum follows numpy's pairwise summation for a contiguous axis of at most 128
  elements: eight running sums over strides of 8, combined as ``((r0+r1)+(r2+r3))+((r4+r5)+(r6+r7))``,
  then the remainder in order (fewer than 8 elements: in order from 0);
- the first candidate wins ties, as in the numpy loop.

Two details keep the bits: ``np.rint`` is written as vector adds (:func:`_rint`), and a squared
error is kept from being fused into the running sum (:func:`_error`).
``tests/quant/test_mse_kernel.py`` checks the
result against the numpy form bit for bit. Group sizes above 128 (numpy then splits the sum
recursively) keep the numpy form (:func:`moec.quant.methods.kernel_searches`).
"""

# No `from __future__ import annotations`: TVMScript needs the evaluated buffer annotations.

import functools
import threading

import numpy as np
import tvm
from tvm import tirx
from tvm.script import tirx as T

from moec.core.targets import load_target
from moec.quant.affine import ceil_fp16, group_range, max_level

_build_lock = threading.Lock()


#: 1.5 * 2**23: adding and subtracting it rounds a float32 of magnitude below 2**22 to the nearest
#: whole number, ties to even (the FPU's default rounding), in plain vector adds.
_ROUND_MAGIC = 12582912.0


def _rint(x, mg):
    """``np.rint`` for ``|x| < 2**22`` as vector-friendly arithmetic (TVM scalarises ``nearbyint``).

    Here ``x = w / scale`` with ``scale >= p·(hi − lo) / maxq`` and ``p >= 2**-10`` (the shrink
    factors :func:`moec.quant.methods.kernel_searches` admits), so ``|x| <= 2**10 · maxq < 2**22``.
    TVM's simplifier treats floats as reals and cancels ``(x + c) − c`` for any expression ``c``, so
    the constant is added from ``mg[0]`` and subtracted from ``mg[1]``: two argument-buffer loads
    that hold the same value at run time but that the simplifier cannot equate.
    """
    return (x + mg[0]) - mg[1]


def _error(w, scale, zero, maxq: float, importance, mg):
    """One weight's ``(w − clamp(rint(w / scale), −zero, maxq − zero) · scale)² · importance`` (float32).

    Two roundings matter. ``w − c·scale`` may be fused (``c·scale`` is exact: an integer of at most
    9 bits times an fp16 value); the squared error must be rounded before it joins a running sum,
    but LLVM fuses a multiply into the next add (``fma``) on targets that have one, so
    ``max(e, 0)`` (``e >= 0`` for non-negative importance: it changes no value) sits between them.
    """
    f32 = "float32"
    c = T.min(T.max(_rint(w / scale, mg), tirx.const(0.0, f32) - zero), tirx.const(maxq, f32) - zero)
    d = w - c * scale
    return T.max(d * d * importance, tirx.const(0.0, f32))


def _pairwise_sum(acc, e, gs: int):
    """numpy's pairwise float32 sum of a group (gs <= 128) as a TIR expression.

    ``acc[j]`` holds the running sum of errors ``j, j + 8, …`` over the group's whole strides of 8
    and ``e`` the errors after them, in order (the whole group when gs < 8).
    """
    if gs < 8:
        total = tirx.const(0.0, "float32")
        for k in range(gs):
            total = total + e[k]
        return total
    total = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
    for k in range(gs % 8):
        total = total + e[k]
    return total


def _kernel(bits: int, gs: int) -> tirx.PrimFunc:
    maxq = float((1 << bits) - 1)
    blocks = gs // 8  # whole strides of 8 summed in the running sums
    f32 = "float32"

    @T.prim_func(check_well_formed=False)
    def mse_search(w_h: T.handle, imp_h: T.handle, shr_h: T.handle, mg_h: T.handle, scale_h: T.handle,
                   zero_h: T.handle):
        T.func_attr({"global_symbol": "mse_search", "tirx.noalias": True})
        rows = T.int32()
        groups = T.int32()
        shrinks = T.int32()
        w = T.match_buffer(w_h, (rows, gs), "float32")
        imp = T.match_buffer(imp_h, (groups, gs), "float32")
        shr = T.match_buffer(shr_h, (shrinks,), "float32")
        mg = T.match_buffer(mg_h, (2,), "float32")  # _ROUND_MAGIC twice, see _rint
        scale = T.match_buffer(scale_h, (rows,), "float16")
        zero = T.match_buffer(zero_h, (rows,), "uint8")
        for r in range(rows):
            acc = T.alloc_buffer((8,), "float32", scope="local")  # numpy's eight running sums
            e = T.alloc_buffer((8,), "float32", scope="local")
            # lo, hi, best err, best scale, best zero, and the candidate's p·lo, p·hi (see below)
            st = T.alloc_buffer((7,), "float32", scope="local")
            g: T.int32 = r % groups
            st[0] = T.float32(0)
            st[1] = T.float32(0)
            st[2] = T.float32(3.4e38)  # no candidate yet: the first one (p = 1) always wins
            for k in range(gs):
                st[0] = T.min(st[0], w[r, k])
                st[1] = T.max(st[1], w[r, k])
            for s in range(shrinks):
                # p·lo and p·hi go through a buffer: TVM's simplifier would factor p·hi − p·lo
                # into p·(hi − lo), which rounds differently
                st[5] = st[0] * shr[s]
                st[6] = st[1] * shr[s]
                raw: T.float32 = (st[6] - st[5]) / T.float32(maxq)
                x: T.float32 = T.Select(raw > T.float32(0), raw, T.float32(1))
                h16: T.float16 = T.Cast("float16", x)
                up: T.float16 = T.Select(
                    T.Cast(f32, h16) < x,
                    T.reinterpret("float16", T.reinterpret("uint16", h16) + T.uint16(1)), h16)
                sc: T.float32 = T.Cast(f32, up)
                z: T.float32 = T.min(T.max(T.nearbyint((T.float32(0) - st[5]) / sc), T.float32(0)),
                                     T.float32(maxq))
                if blocks > 0:  # numpy's eight running sums over strides of 8 (a build-time constant)
                    for j in T.vectorized(8):
                        acc[j] = _error(w[r, j], sc, z, maxq, imp[g, j], mg)
                    for i in range(1, blocks):
                        for j in T.vectorized(8):
                            acc[j] = acc[j] + _error(w[r, i * 8 + j], sc, z, maxq, imp[g, i * 8 + j], mg)
                for k in range(blocks * 8, gs):  # the remainder (the whole group when gs < 8)
                    e[k - blocks * 8] = _error(w[r, k], sc, z, maxq, imp[g, k], mg)
                err: T.float32 = _pairwise_sum(acc, e, gs)
                if err < st[2]:
                    st[2] = err
                    st[3] = sc
                    st[4] = z
            scale[r] = T.Cast("float16", st[3])
            zero[r] = T.Cast("uint8", st[4])

    return mse_search


@functools.lru_cache(maxsize=None)
def _compiled(bits: int, gs: int):
    with _build_lock:
        return tvm.compile(_kernel(bits, gs), target=load_target("host").tvm())["mse_search"]


def mse_search(wg: np.ndarray, bits: int, importance: np.ndarray | None,
               shrinks: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """``mse_params`` for float32 ``wg [N, G, gs]``: ``scale`` fp16 and ``zero`` uint8 ``[N, G]``.

    Call only where :func:`moec.quant.methods.kernel_searches` holds (``|w / scale| < 2**22``
    for :func:`_rint`, a group of at most 128). A group whose range needs a scale beyond float16
    raises the same :class:`MoecError` as the numpy form (checked before the kernel runs).
    """
    n, groups, gs = wg.shape
    lo, hi = group_range(wg)
    ceil_fp16(((hi - lo) / np.float32(max_level(bits))).max(initial=0.0)[None])  # raises if too large
    w2 = np.ascontiguousarray(wg, dtype=np.float32).reshape(n * groups, gs)
    if importance is None:
        imp = np.ones((groups, gs), np.float32)
    else:
        imp = np.ascontiguousarray(np.broadcast_to(importance, (1, groups, gs))[0], dtype=np.float32)
    ins = [_tensor(a) for a in (w2, imp, np.asarray(shrinks, np.float32),
                                np.full(2, _ROUND_MAGIC, np.float32))]
    scale = tvm.runtime.empty((n * groups,), "float16")
    zero = tvm.runtime.empty((n * groups,), "uint8")
    _compiled(bits, gs)(*ins, scale, zero)
    return scale.numpy().reshape(n, groups), zero.numpy().reshape(n, groups)


def _tensor(a: np.ndarray):
    """A TVM tensor over ``a``'s memory when TVM accepts its alignment (64 bytes), else a copy."""
    zero_copy = a.ctypes.data % 64 == 0 and a.flags.writeable  # DLPack cannot mark read-only memory
    return tvm.runtime.from_dlpack(a) if zero_copy else tvm.runtime.tensor(a)
