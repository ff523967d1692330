"""CUDA prefill causal attention, hand-written TIR with threads bound: one block per (head, tile of query rows),
the keys taken a tile at a time with a running (online) softmax, so no ``[heads, T, S]`` score array exists.

``attention(q [T, H, hd], keys [KVH, S, hd], values [KVH, S, vd], out [T, H, vd])``: ``q`` pre-scaled, row ``t``
at position ``P + t`` (``P = S − T``, the cached positions) attends to keys ``0 .. P + t``; query head ``h``
reads KV head ``h // (H / KVH)``. A block of ``THREADS`` threads holds ``BQ`` query rows in shared memory and,
per tile of ``BKV`` keys up to its last row's position, in phases separated by barriers:

1. copies the tile's keys and values into shared memory;
2. each thread computes ``BKV / ROW_THREADS`` scores of its row (keys past the row's position: ``MASKED``);
3. each thread takes its row's maximum and probabilities ``exp(s − m_new)`` (0 where masked) itself, in
   registers (the ``ROW_THREADS`` threads of a row repeat that work instead of waiting on one another), rescales
   its running sum and its ``vd / ROW_THREADS`` output columns by ``exp(m_old − m_new)`` and adds the tile's
   probabilities times the values.

The outputs are divided by the row's sum at the end. The dlight schedule of the TE form it replaces
(``te_ops.causal_row_scores`` / softmax / ``causal_row_values``) computed each score in a block of its own.
``bind=False``: each phase a serial loop over the threads (the GPU's barriers between phases), for CPU tests.
"""

from __future__ import annotations

import functools

from tvm import tirx
from tvm.script import tirx as T

from moec.core.errors import MoecError
from moec.lower.te_ops import MASKED

THREADS = 128
BQ, BKV = 16, 16  # query rows and keys of a tile
ROW_THREADS = THREADS // BQ  # threads sharing a query row
SHARED_BYTES = 48 * 1024  # a block's static shared memory


def check_shape(heads: int, kv_heads: int, hd: int, vd: int) -> None:
    """One-line error where the kernel does not take the shape (then the TE form stays)."""
    need = 4 * (BQ * hd + BKV * hd + BKV * vd + BQ * BKV)
    if heads % kv_heads or vd % ROW_THREADS or need > SHARED_BYTES:
        raise MoecError(f"cuda prefill attention: {heads} heads over {kv_heads}, head dims {hd}/{vd} (values a "
                        f"multiple of {ROW_THREADS}; {need} B of shared memory, at most {SHARED_BYTES})")


def _macro(heads: int, kv_heads: int, hd: int, vd: int, bind: bool):
    rep = heads // kv_heads
    per_s, per_o = BKV // ROW_THREADS, vd // ROW_THREADS  # scores and output columns a thread

    def cover(n: int) -> int:
        """Passes of the block's threads over ``n`` elements."""
        return (n + THREADS - 1) // THREADS

    @T.macro
    def load_q(q, qs, rows, t0, h, tid):
        for i in range(cover(BQ * hd)):
            if i * THREADS + tid < BQ * hd:
                qs[(i * THREADS + tid) // hd, (i * THREADS + tid) % hd] = q[
                    T.min(t0 + (i * THREADS + tid) // hd, rows - 1), h, (i * THREADS + tid) % hd]

    @T.macro
    def load_kv(keys, values, ks, vs, s0, last, h, tid):
        for i in range(cover(BKV * hd)):
            if i * THREADS + tid < BKV * hd:
                ks[(i * THREADS + tid) // hd, (i * THREADS + tid) % hd] = keys[
                    h // rep, T.min(s0 + (i * THREADS + tid) // hd, last), (i * THREADS + tid) % hd]
        for i in range(cover(BKV * vd)):
            if i * THREADS + tid < BKV * vd:
                vs[(i * THREADS + tid) // vd, (i * THREADS + tid) % vd] = values[
                    h // rep, T.min(s0 + (i * THREADS + tid) // vd, last), (i * THREADS + tid) % vd]

    @T.macro
    def scores(qs, ks, sc, dot, slot, p, t0, s0, tid):
        for j in range(per_s):
            dot[slot] = T.float32(0)
            for d in range(hd):
                dot[slot] = dot[slot] + qs[tid // ROW_THREADS, d] * ks[tid % ROW_THREADS * per_s + j, d]
            sc[tid // ROW_THREADS, tid % ROW_THREADS * per_s + j] = T.if_then_else(
                s0 + tid % ROW_THREADS * per_s + j > p + t0 + tid // ROW_THREADS, T.float32(MASKED), dot[slot])

    @T.macro
    def softmax_accumulate(sc, vs, st, pl, acc, slot, p, t0, s0, tid):
        """The tile's part of the thread's row: every thread of a row takes the row's maximum and probabilities
        itself (registers; no thread waits on another's), rescales its running sum and output columns by
        ``exp(m_old − m_new)`` and adds the tile's probabilities times the values. ``st[slot]``: the row's running
        maximum, running sum, this tile's new maximum."""
        st[slot, 2] = st[slot, 0]
        for j in range(BKV):
            st[slot, 2] = T.max(st[slot, 2], sc[tid // ROW_THREADS, j])
        for j in range(BKV):
            pl[slot, j] = T.if_then_else(s0 + j > p + t0 + tid // ROW_THREADS, T.float32(0),
                                         T.exp(sc[tid // ROW_THREADS, j] - st[slot, 2]))
        st[slot, 1] = st[slot, 1] * T.exp(st[slot, 0] - st[slot, 2])
        for j in range(BKV):
            st[slot, 1] = st[slot, 1] + pl[slot, j]
        for c in range(per_o):
            acc[slot, c] = acc[slot, c] * T.exp(st[slot, 0] - st[slot, 2])
            for j in range(BKV):
                acc[slot, c] = acc[slot, c] + pl[slot, j] * vs[j, tid % ROW_THREADS * per_o + c]
        st[slot, 0] = st[slot, 2]

    @T.macro
    def store(out, st, acc, slot, rows, t0, h, tid):
        if t0 + tid // ROW_THREADS < rows:
            for c in range(per_o):
                out[t0 + tid // ROW_THREADS, h, tid % ROW_THREADS * per_o + c] = acc[slot, c] / st[slot, 1]

    @T.macro
    def init(st, acc, slot):
        st[slot, 0] = T.float32(MASKED)
        st[slot, 1] = T.float32(0)
        for c in range(per_o):
            acc[slot, c] = T.float32(0)

    def tiles_of(p, rows, t0):
        """Key tiles up to the last row's position."""
        return (p + T.min(t0 + BQ, rows) + BKV - 1) // BKV

    @T.macro
    def bound(q, keys, values, p, rows, out):
        for b in T.thread_binding(heads * ((rows + BQ - 1) // BQ), thread="blockIdx.x"):
            for tid in T.thread_binding(THREADS, thread="threadIdx.x"):
                qs = T.alloc_buffer((BQ, hd), "float32", scope="shared")
                ks = T.alloc_buffer((BKV, hd), "float32", scope="shared")
                vs = T.alloc_buffer((BKV, vd), "float32", scope="shared")
                sc = T.alloc_buffer((BQ, BKV), "float32", scope="shared")
                acc = T.alloc_buffer((1, per_o), "float32", scope="local")
                st = T.alloc_buffer((1, 3), "float32", scope="local")
                pl = T.alloc_buffer((1, BKV), "float32", scope="local")
                dot = T.alloc_buffer((1,), "float32", scope="local")
                init(st, acc, 0)
                load_q(q, qs, rows, b // heads * BQ, b % heads, tid)
                for kt in range(tiles_of(p, rows, b // heads * BQ)):
                    load_kv(keys, values, ks, vs, kt * BKV, p + rows - 1, b % heads, tid)
                    T.tvm_storage_sync("shared")
                    scores(qs, ks, sc, dot, 0, p, b // heads * BQ, kt * BKV, tid)
                    T.tvm_storage_sync("shared")
                    softmax_accumulate(sc, vs, st, pl, acc, 0, p, b // heads * BQ, kt * BKV, tid)
                    T.tvm_storage_sync("shared")
                store(out, st, acc, 0, rows, b // heads * BQ, b % heads, tid)

    @T.macro
    def serial(q, keys, values, p, rows, out):
        for b in range(heads * ((rows + BQ - 1) // BQ)):
            qs = T.alloc_buffer((BQ, hd), "float32")
            ks = T.alloc_buffer((BKV, hd), "float32")
            vs = T.alloc_buffer((BKV, vd), "float32")
            sc = T.alloc_buffer((BQ, BKV), "float32")
            acc = T.alloc_buffer((THREADS, per_o), "float32")
            st = T.alloc_buffer((THREADS, 3), "float32")
            pl = T.alloc_buffer((THREADS, BKV), "float32")
            dot = T.alloc_buffer((THREADS,), "float32")
            for tid in range(THREADS):
                init(st, acc, tid)
                load_q(q, qs, rows, b // heads * BQ, b % heads, tid)
            for kt in range(tiles_of(p, rows, b // heads * BQ)):
                for tid in range(THREADS):
                    load_kv(keys, values, ks, vs, kt * BKV, p + rows - 1, b % heads, tid)
                for tid in range(THREADS):
                    scores(qs, ks, sc, dot, tid, p, b // heads * BQ, kt * BKV, tid)
                for tid in range(THREADS):
                    softmax_accumulate(sc, vs, st, pl, acc, tid, p, b // heads * BQ, kt * BKV, tid)
            for tid in range(THREADS):
                store(out, st, acc, tid, rows, b // heads * BQ, b % heads, tid)

    return bound if bind else serial


@functools.lru_cache(maxsize=None)
def cuda_causal_attention(heads: int, kv_heads: int, hd: int, vd: int, bind: bool = True) -> tirx.PrimFunc:
    """``attention(q, keys, values, out)`` (module docstring); a one-line :class:`MoecError` for a shape it does
    not take."""
    check_shape(heads, kv_heads, hd, vd)
    macro = _macro(heads, kv_heads, hd, vd, bind)

    @T.prim_func
    def attention(q_h: T.handle, k_h: T.handle, v_h: T.handle, o_h: T.handle):
        T.func_attr({"global_symbol": "cuda_causal_attention", "tirx.noalias": True, "tirx.is_scheduled": True})
        rows, keys_len = T.int64(), T.int64()
        q = T.match_buffer(q_h, (rows, heads, hd), "float32")
        keys = T.match_buffer(k_h, (kv_heads, keys_len, hd), "float32")
        values = T.match_buffer(v_h, (kv_heads, keys_len, vd), "float32")
        out = T.match_buffer(o_h, (rows, heads, vd), "float32")
        macro(q, keys, values, keys_len - rows, rows, out)  # the cached positions: P = S - T

    return attention
