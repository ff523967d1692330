"""Prefill grouped GEMM kernels (every bit class and float) against per-expert numpy matmuls."""

from __future__ import annotations

import numpy as np
import pytest

from moec.lower.kernels.factory import host_target, make_grouped_gemm

from kernel_helpers import KernelCache, assert_close, call, expert_stack, weight_args

pytestmark = pytest.mark.tvm


@pytest.fixture(scope="module")
def kernels():
    return KernelCache(host_target())


def _check(kernels, bits, n, k, gs, counts, seed=0):
    experts = len(counts)
    mod = kernels.get(make_grouped_gemm, bits, n, k, gs, experts)
    stack, deq = expert_stack(bits, n, k, gs, experts, seed=seed)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    x = np.random.default_rng(seed + 1).standard_normal((int(offsets[-1]), k)).astype(np.float32)
    out = call(mod, "grouped_gemm", [x] + weight_args(stack) + [offsets, np.zeros((len(x), n), np.float32)])
    ref = np.concatenate([x[offsets[e]:offsets[e + 1]] @ deq[e].T for e in range(experts)])
    assert_close(out, ref)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8, 16, 32])
def test_grouped_gemm_matches_reference(kernels, bits):
    # Token counts: an empty expert, a single token, and blocks with tails (tokens per block 4).
    _check(kernels, bits, 80, 256, 64, [3, 0, 9, 1])


@pytest.mark.parametrize("bits", [3, 16])
def test_grouped_gemm_other_token_counts(kernels, bits):
    """Same compiled kernel, a different number of routed tokens (T is symbolic)."""
    _check(kernels, bits, 80, 256, 64, [0, 17, 4, 2], seed=5)
    _check(kernels, bits, 80, 256, 64, [1, 1, 1, 1], seed=6)


@pytest.mark.parametrize("bits", [2, 4])
def test_grouped_gemm_small_groups(kernels, bits):
    _check(kernels, bits, 32, 64, 16, [2, 5])


@pytest.mark.parametrize("bits", [3, 32])
def test_grouped_gemm_single_vector_of_rows(kernels, bits):
    _check(kernels, bits, 16, 64, 32, [1, 6])
