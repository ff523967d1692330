"""Prefill attention kernels for CPUs: causal scores and values of a prompt chunk, parallel and vectorised.

The same arithmetic as :func:`moec.lower.te_ops.causal_scores` / :func:`~moec.lower.te_ops.causal_values`
(whose plain TE reductions ran single-threaded and unvectorised: 54 % of a 512-token prefill of
the OLMoE-shaped model), written as explicit TIR: one parallel task per (head, query row), keys
past the row's position never read (their score is ``MASKED``, -1e30; their probability is exactly 0, so the
values kernel stops at the row's position); the tasks go in pairs of the cheapest and costliest
row blocks left, so TVM's contiguous split gives each thread the same work (:func:`_balanced_block`).
The scores kernel reads the keys transposed (``[kv_heads, head_dim, S]``) so a vector holds 16 keys'
scores (no horizontal sums).
"""

# No `from __future__ import annotations`: TVMScript needs the evaluated buffer annotations.

from math import gcd

from tvm import tirx
from tvm.script import tirx as T

from moec.lower.te_ops import MASKED


def _balanced_block(j, blocks):
    """The row block of a kernel's ``j``-th block of tasks: 0, last, 1, last - 1, ...

    A causal block's cost grows with its rows' positions, and TVM hands each thread a contiguous
    range of a parallel loop's tasks: in row order the second of two threads got 3/4 of a 512-token
    prompt's attention (2 threads ran 1.36x one). Paired cheap-with-costly, every range of whole
    pairs has the same cost, at any thread count that divides the pairs.
    """
    return j // 2 + j % 2 * (blocks - 1 - 2 * (j // 2))  # j // 2 when even, blocks - 1 - j // 2 when odd


def _key_vector_scores(rep: int, head_dim: int, block: int, lanes: int):
    """Macro: ``acc[r, :]`` = the scores of query rows ``t0 .. t0 + block`` (clamped to the last row) of
    head ``h`` against key vector ``c`` (``lanes`` keys), one FMA chain per row (shared by the scores
    and the fused attention kernels, so their scores are the same bits)."""

    @T.macro
    def key_vector_scores(acc, q, keys_t, h, t0, c, rows):
        for r in T.unroll(block):
            for lane in T.vectorized(lanes):
                acc[r, lane] = T.float32(0)
        for d in range(head_dim):
            for r in T.unroll(block):
                for lane in T.vectorized(lanes):
                    acc[r, lane] = acc[r, lane] + q[T.min(t0 + r, rows - 1), h, d] * keys_t[
                        h // rep, d, c * lanes + lane]

    return key_vector_scores


def causal_scores_kernel(heads: int, kv_heads: int, head_dim: int, lanes: int = 16,
                         block: int = 4) -> tirx.PrimFunc:
    """``scores[h, t, s] = q[t, h] · keys[h // rep, s]`` for ``s <= S - T + t``, else ``MASKED``.

    ``q`` float32 ``[T, heads, head_dim]`` (pre-scaled), ``keys_t`` the keys transposed,
    ``[kv_heads, head_dim, S]`` (``S`` = cached + ``T``), ``scores`` ``[heads, T, S]``; ``T`` and
    ``S`` are symbolic. A task is one head and ``block`` query rows: each vector of ``lanes``
    keys (one load per head-dim value) meets every row's broadcast query value, into ``block``
    independent accumulators (no horizontal sums).
    """
    rep = heads // kv_heads
    key_vector_scores = _key_vector_scores(rep, head_dim, block, lanes)

    @T.prim_func
    def causal_scores(q_h: T.handle, k_h: T.handle, out_h: T.handle):
        T.func_attr({"global_symbol": "causal_scores", "tirx.noalias": True})
        rows = T.int32()
        keys_len = T.int32()
        q = T.match_buffer(q_h, (rows, heads, head_dim), "float32")
        keys_t = T.match_buffer(k_h, (kv_heads, head_dim, keys_len), "float32")
        out = T.match_buffer(out_h, (heads, rows, keys_len), "float32")
        for task in T.parallel(heads * ((rows + block - 1) // block)):
            acc = T.alloc_buffer((block, lanes), "float32", scope="local")
            h: T.int32 = task % heads
            t0: T.int32 = _balanced_block(task // heads, (rows + block - 1) // block) * block
            # the last key each row sees is its own position, keys_len - rows + t
            last: T.int32 = keys_len - rows + T.min(t0 + block, rows) - 1
            for c in range(keys_len // lanes):
                if c * lanes <= last:
                    key_vector_scores(acc, q, keys_t, h, t0, c, rows)
                    for r in T.unroll(block):
                        if t0 + r < rows:
                            for lane in T.vectorized(lanes):
                                out[h, t0 + r, c * lanes + lane] = T.if_then_else(
                                    c * lanes + lane <= keys_len - rows + t0 + r, acc[r, lane], T.float32(MASKED))
                else:
                    for r in T.unroll(block):
                        if t0 + r < rows:
                            for lane in T.vectorized(lanes):
                                out[h, t0 + r, c * lanes + lane] = T.float32(MASKED)
            for r in T.unroll(block):
                if t0 + r < rows:
                    for s in range(keys_len // lanes * lanes, keys_len):  # the last partial vector of keys
                        acc[0, 0] = T.float32(0)
                        for d in range(head_dim):
                            acc[0, 0] = acc[0, 0] + q[t0 + r, h, d] * keys_t[h // rep, d, s]
                        out[h, t0 + r, s] = T.if_then_else(s <= keys_len - rows + t0 + r, acc[0, 0],
                                                           T.float32(MASKED))

    return causal_scores


def causal_values_kernel(heads: int, kv_heads: int, value_dim: int, lanes: int = 16,
                         block: int = 4) -> tirx.PrimFunc:
    """``attn[t, h] = sum_{s <= S - T + t} probs[h, t, s] * values[h // rep, s]``.

    ``probs`` float32 ``[heads, T, SP]`` (``SP`` = ``S``, or ``S + 1`` with a sink column, never
    read), ``values`` ``[kv_heads, S, value_dim]``, ``attn`` ``[T, heads, value_dim]``. A task is one
    head and ``block`` query rows: each value row is loaded once for the block (the keys of a
    512-token prompt's head do not fit in L1). The block's rows run to its last row's position: a
    row's probabilities past its own position are exactly 0 (masked scores), so each row's sum is the
    one it has alone, in the same order.
    """
    rep, vl = heads // kv_heads, gcd(value_dim, lanes)
    chunks = value_dim // vl

    @T.prim_func
    def causal_values(p_h: T.handle, v_h: T.handle, out_h: T.handle):
        T.func_attr({"global_symbol": "causal_values", "tirx.noalias": True})
        rows = T.int32()
        prob_cols = T.int32()
        keys_len = T.int32()
        probs = T.match_buffer(p_h, (heads, rows, prob_cols), "float32")
        values = T.match_buffer(v_h, (kv_heads, keys_len, value_dim), "float32")
        out = T.match_buffer(out_h, (rows, heads, value_dim), "float32")
        for task in T.parallel(heads * ((rows + block - 1) // block)):
            acc = T.alloc_buffer((block, value_dim), "float32", scope="local")
            h: T.int32 = task % heads
            t0: T.int32 = _balanced_block(task // heads, (rows + block - 1) // block) * block
            for r in T.unroll(block):
                for c in T.unroll(chunks):
                    for lane in T.vectorized(vl):
                        acc[r, c * vl + lane] = T.float32(0)
            for s in range(keys_len - rows + T.min(t0 + block, rows)):
                for r in T.unroll(block):
                    for c in T.unroll(chunks):
                        for lane in T.vectorized(vl):
                            # tail rows of the last block recompute the last row (never stored)
                            acc[r, c * vl + lane] = acc[r, c * vl + lane] + probs[
                                h, T.min(t0 + r, rows - 1), s] * values[h // rep, s, c * vl + lane]
            for r in T.unroll(block):
                if t0 + r < rows:
                    for c in T.unroll(chunks):
                        for lane in T.vectorized(vl):
                            out[t0 + r, h, c * vl + lane] = acc[r, c * vl + lane]

    return causal_values


def causal_attention_kernel(heads: int, kv_heads: int, head_dim: int, value_dim: int, lanes: int = 16,
                            block: int = 8, value_rows: int = 4) -> tirx.PrimFunc:
    """Scores, softmax and values of :func:`causal_scores_kernel`, :func:`moec.lower.kernels.rowwise.softmax_kernel`
    (``causal``) and :func:`causal_values_kernel` in one kernel, the same arithmetic bit for bit.

    ``q`` ``[T, heads, head_dim]`` (pre-scaled), ``keys_t`` ``[kv_heads, head_dim, S]``, ``values``
    ``[kv_heads, S, value_dim]``, ``attn`` ``[T, heads, value_dim]``. A task (one head, ``block`` query
    rows) keeps its rows' scores and probabilities in a ``[block, S]`` workspace of its own instead of
    the three kernels' ``[heads, T, S]`` arrays (4 MiB per layer for a 512-token prompt of 4 heads,
    written and read back through L3 twice). Scores: ``block`` accumulators per key vector (8 hide
    the FMA latency; 4 left the scores at ~60 GFLOP/s); values: ``value_rows`` rows at a time
    (``value_rows * value_dim / lanes`` accumulators).
    """
    assert block % value_rows == 0
    rep, vl = heads // kv_heads, gcd(value_dim, lanes)
    chunks = value_dim // vl
    from moec.lower.kernels.rowwise import fast_exp
    key_vector_scores = _key_vector_scores(rep, head_dim, block, lanes)

    @T.prim_func
    def causal_attention(q_h: T.handle, k_h: T.handle, v_h: T.handle, out_h: T.handle):
        T.func_attr({"global_symbol": "causal_attention", "tirx.noalias": True})
        rows = T.int32()
        keys_len = T.int32()
        q = T.match_buffer(q_h, (rows, heads, head_dim), "float32")
        keys_t = T.match_buffer(k_h, (kv_heads, head_dim, keys_len), "float32")
        values = T.match_buffer(v_h, (kv_heads, keys_len, value_dim), "float32")
        out = T.match_buffer(out_h, (rows, heads, value_dim), "float32")
        for task in T.parallel(heads * ((rows + block - 1) // block)):
            p = T.alloc_buffer((block, keys_len), "float32")
            acc = T.alloc_buffer((block, lanes), "float32", scope="local")
            vacc = T.alloc_buffer((value_rows, value_dim), "float32", scope="local")
            red = T.alloc_buffer((lanes,), "float32", scope="local")
            h: T.int32 = task % heads
            t0: T.int32 = _balanced_block(task // heads, (rows + block - 1) // block) * block
            last: T.int32 = keys_len - rows + T.min(t0 + block, rows) - 1
            # scores (causal_scores): vectors of keys up to the block's last position
            for c in range(keys_len // lanes):
                if c * lanes <= last:
                    key_vector_scores(acc, q, keys_t, h, t0, c, rows)
                    for r in T.unroll(block):
                        for lane in T.vectorized(lanes):
                            p[r, c * lanes + lane] = T.if_then_else(
                                c * lanes + lane <= keys_len - rows + t0 + r, acc[r, lane], T.float32(MASKED))
            for r in T.unroll(block):
                if t0 + r < rows:
                    for s in range(keys_len // lanes * lanes, keys_len):  # the last partial vector of keys
                        acc[0, 0] = T.float32(0)
                        for d in range(head_dim):
                            acc[0, 0] = acc[0, 0] + q[t0 + r, h, d] * keys_t[h // rep, d, s]
                        p[r, s] = T.if_then_else(s <= keys_len - rows + t0 + r, acc[0, 0], T.float32(MASKED))
            # softmax (softmax_kernel, causal) of each row over its columns up to its position
            for r in range(block):
                if t0 + r < rows:
                    stop: T.int32 = keys_len - rows + t0 + r + 1
                    vecs: T.int32 = T.min((stop + lanes - 1) // lanes, keys_len // lanes)
                    tail: T.int32 = T.max(stop, keys_len // lanes * lanes)
                    for lane in T.vectorized(lanes):
                        red[lane] = T.float32(-3.0e38)
                    for c in range(vecs):
                        for lane in T.vectorized(lanes):
                            red[lane] = T.max(red[lane], p[r, c * lanes + lane])
                    for c in range(keys_len // lanes * lanes, tail):
                        red[0] = T.max(red[0], p[r, c])
                    for lane in range(1, lanes):
                        red[0] = T.max(red[0], red[lane])
                    top: T.float32 = red[0]
                    for lane in T.vectorized(lanes):
                        red[lane] = T.float32(0)
                    for c in range(vecs):
                        for lane in T.vectorized(lanes):
                            p[r, c * lanes + lane] = fast_exp(p[r, c * lanes + lane] - top)
                            red[lane] = red[lane] + p[r, c * lanes + lane]
                    for c in range(keys_len // lanes * lanes, tail):
                        p[r, c] = fast_exp(p[r, c] - top)
                        red[0] = red[0] + p[r, c]
                    for lane in range(1, lanes):
                        red[0] = red[0] + red[lane]
                    inv: T.float32 = T.float32(1) / red[0]
                    for c in range(vecs):
                        for lane in T.vectorized(lanes):
                            p[r, c * lanes + lane] = p[r, c * lanes + lane] * inv
                    for c in range(keys_len // lanes * lanes, tail):
                        p[r, c] = p[r, c] * inv
                    # columns the block's later rows reach: probability exactly 0 for this row
                    for c in range(T.if_then_else(stop <= keys_len // lanes * lanes, vecs * lanes, stop), last + 1):
                        p[r, c] = T.float32(0)
            # values (causal_values), value_rows rows at a time, each up to its sub-block's last position
            for vb in range(block // value_rows):
                if t0 + vb * value_rows < rows:
                    for r in T.unroll(value_rows):
                        for c in T.unroll(chunks):
                            for lane in T.vectorized(vl):
                                vacc[r, c * vl + lane] = T.float32(0)
                    for s in range(keys_len - rows + T.min(t0 + vb * value_rows + value_rows, rows)):
                        for r in T.unroll(value_rows):
                            for c in T.unroll(chunks):
                                for lane in T.vectorized(vl):
                                    vacc[r, c * vl + lane] = vacc[r, c * vl + lane] + p[
                                        T.min(vb * value_rows + r, rows - 1 - t0), s] * values[h // rep, s,
                                                                                            c * vl + lane]
                    for r in T.unroll(value_rows):
                        if t0 + vb * value_rows + r < rows:
                            for c in T.unroll(chunks):
                                for lane in T.vectorized(vl):
                                    out[t0 + vb * value_rows + r, h, c * vl + lane] = vacc[r, c * vl + lane]

    return causal_attention
