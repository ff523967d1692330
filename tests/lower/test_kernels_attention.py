"""Prefill attention kernels (causal scores and values) against numpy, on the host and as aarch64 code."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm

from moec.core.targets import load_target
from moec.lower.kernels.attention import causal_attention_kernel, causal_scores_kernel, causal_values_kernel
from moec.lower.kernels.factory import compile_kernel, host_target
from moec.lower.kernels.rowwise import softmax_kernel

from kernel_helpers import call

pytestmark = pytest.mark.tvm


def _scores_ref(q, keys):
    rows, heads, _ = q.shape
    rep, keys_len = heads // keys.shape[0], keys.shape[1]
    out = np.einsum("thd,hsd->hts", q, np.repeat(keys, rep, axis=0))
    future = np.arange(keys_len)[None, :] > (keys_len - rows + np.arange(rows))[:, None]
    return np.where(future[None], np.float32(-1e30), out)


@pytest.mark.parametrize("heads,kv_heads,head_dim,rows,past", [(4, 2, 32, 5, 3), (2, 1, 24, 3, 0), (2, 2, 16, 20, 30)])
def test_causal_attention_kernels_match_numpy(heads, kv_heads, head_dim, rows, past):
    """Grouped KV heads, a filled cache or none, head dims with 16 and 8 lanes, fewer keys than a vector
    and whole vectors of keys both inside and past a row's position; a sink column in probs."""
    rng = np.random.default_rng(heads + past)
    keys_len = past + rows
    q = rng.standard_normal((rows, heads, head_dim)).astype(np.float32)
    keys = rng.standard_normal((kv_heads, keys_len, head_dim)).astype(np.float32)
    values = rng.standard_normal((kv_heads, keys_len, head_dim)).astype(np.float32)
    target = host_target()
    scores = call(compile_kernel(causal_scores_kernel(heads, kv_heads, head_dim), target), "causal_scores",
                  [q, np.ascontiguousarray(keys.transpose(0, 2, 1)), np.zeros((heads, rows, keys_len), np.float32)])
    np.testing.assert_allclose(scores, _scores_ref(q, keys), rtol=1e-5, atol=1e-5)
    # probs with a sink column (never read) and exact zeros past each row's position
    logits = np.concatenate([_scores_ref(q, keys), np.zeros((heads, rows, 1), np.float32)], axis=-1)
    probs = np.exp(logits - logits.max(-1, keepdims=True)).astype(np.float32)
    probs /= probs.sum(-1, keepdims=True)
    attn = call(compile_kernel(causal_values_kernel(heads, kv_heads, head_dim), target), "causal_values",
                [probs, values, np.zeros((rows, heads, head_dim), np.float32)])
    ref = np.einsum("hts,hsd->thd", probs[..., :keys_len], np.repeat(values, heads // kv_heads, axis=0))
    np.testing.assert_allclose(attn, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads,kv_heads,head_dim,rows,past", [(4, 2, 64, 37, 11), (2, 1, 24, 3, 0), (2, 2, 16, 21, 30),
                                                               (4, 2, 32, 1, 16)])
def test_fused_causal_attention_is_the_three_kernels_bit_for_bit(heads, kv_heads, head_dim, rows, past):
    """The fused kernel equals scores -> causal softmax -> values exactly (and numpy closely): blocks of rows whose
    positions end in different key vectors (past 11), key counts with and without a partial vector, one row."""
    rng = np.random.default_rng(rows + past)
    keys_len = past + rows
    q = (rng.standard_normal((rows, heads, head_dim)) * 0.3).astype(np.float32)
    keys = rng.standard_normal((kv_heads, keys_len, head_dim)).astype(np.float32)
    values = rng.standard_normal((kv_heads, keys_len, head_dim)).astype(np.float32)
    keys_t = np.ascontiguousarray(keys.transpose(0, 2, 1))
    target = host_target()
    scores = call(compile_kernel(causal_scores_kernel(heads, kv_heads, head_dim), target), "causal_scores",
                  [q, keys_t, np.zeros((heads, rows, keys_len), np.float32)])
    probs = call(compile_kernel(softmax_kernel(heads, causal=True), target), "row_softmax",
                 [scores, np.zeros_like(scores)])
    three = call(compile_kernel(causal_values_kernel(heads, kv_heads, head_dim), target), "causal_values",
                 [probs, values, np.zeros((rows, heads, head_dim), np.float32)])
    fused = call(compile_kernel(causal_attention_kernel(heads, kv_heads, head_dim, head_dim), target),
                 "causal_attention", [q, keys_t, values, np.zeros((rows, heads, head_dim), np.float32)])
    np.testing.assert_array_equal(fused, three)
    logits = _scores_ref(q, keys).astype(np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    ref = np.einsum("hts,hsd->thd", p / p.sum(-1, keepdims=True), np.repeat(values, heads // kv_heads, axis=0))
    np.testing.assert_allclose(fused, ref, rtol=1e-5, atol=1e-5)


def test_causal_attention_kernels_compile_to_neon():
    target = load_target("aarch64-generic").tvm()
    for func in (causal_scores_kernel(4, 2, 64), causal_values_kernel(4, 2, 64), causal_attention_kernel(4, 2, 64, 64)):
        name = func.attrs["global_symbol"]
        asm = tvm.compile(tvm.IRModule({name: func}), target=target).mod.inspect_source("asm")
        assert re.search(r"^\s+fmla\s+v\d+\.4s", asm, re.M), f"{name}: no 4-lane NEON fused multiply-add"


def test_row_blocks_are_a_balanced_permutation():
    """The task order visits every row block once, and the first half of an even count of blocks (TVM's
    contiguous split over two threads) holds half the causal cost (block b costs b + 1)."""
    from moec.lower.kernels.attention import _balanced_block

    for blocks in range(1, 21):
        order = [_balanced_block(j, blocks) for j in range(blocks)]  # the same arithmetic on Python ints
        assert sorted(order) == list(range(blocks))
        if blocks % 4 == 0:
            assert sum(b + 1 for b in order[:blocks // 2]) == sum(b + 1 for b in order[blocks // 2:])
