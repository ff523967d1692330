"""Prefill grouped GEMM kernels (every bit class and float) against per-expert numpy matmuls."""

from __future__ import annotations

import numpy as np
import pytest

from tvm.target import codegen

from moec.core.errors import MoecError
from moec.lower.kernels.activations import dequantized_activations
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


def _vnni():
    return codegen.target_has_features("avx512vnni", host_target())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_int8_grouped_gemm_matches_reference(kernels, bits):
    """VNNI grouped GEMM: x quantized per row and group, rows gathered by index, vs numpy on the int8 grid.

    Token counts cover an empty expert, one token, blocks with tails; 5 rows of x feed 13 pairs
    (a token routed to several experts), and N = 80 leaves a partial task of 16-row vectors."""
    if not _vnni():
        pytest.skip("needs AVX-512 VNNI")
    n, k, gs, counts = 80, 256, 64, [3, 0, 9, 1]
    mod = kernels.get(make_grouped_gemm, bits, n, k, gs, len(counts), activations="int8")
    stack, deq = expert_stack(bits, n, k, gs, len(counts), seed=bits, activations="int8")
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    rng = np.random.default_rng(bits + 1)
    x = rng.standard_normal((5, k)).astype(np.float32)
    rows = rng.integers(0, 5, int(offsets[-1])).astype(np.int32)
    out = call(mod, "grouped_gemm", [x, rows] + weight_args(stack) + [offsets, np.zeros((len(rows), n), np.float32)])
    xr = dequantized_activations(x, gs)[rows]
    ref = np.concatenate([xr[offsets[e]:offsets[e + 1]] @ deq[e].T for e in range(len(counts))])
    assert_close(out, ref)


def test_int8_grouped_gemm_refuses_float_weights_and_missing_vnni():
    with pytest.raises(MoecError, match="int8 activations need quantized weights"):
        make_grouped_gemm(16, 64, 64, 32, 2, host_target(), activations="int8")
    import tvm
    no_vnni = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512", "mtriple": "x86_64-linux-gnu"})
    with pytest.raises(MoecError, match="AVX-512 target need avx512vnni"):
        make_grouped_gemm(4, 64, 64, 32, 2, no_vnni, activations="int8")


def test_int8_grouped_gemm_emits_vpdpbusd():
    if not _vnni():
        pytest.skip("needs AVX-512 VNNI")
    import tvm
    target = host_target()
    ex = tvm.compile(tvm.IRModule({"grouped_gemm": make_grouped_gemm(4, 64, 128, 64, 2, target, activations="int8")}),
                     target=target)
    assert "vpdpbusd" in ex.mod.inspect_source("asm")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_int8_grouped_gemm_unpacked_codes_and_task_order(bits):
    """Experts with at least ``gemm_unpack_tokens`` tokens unpack their codes to bytes once; the int32
    dots are the same sums, so the output is bit-identical to extracting per block (and so is any
    task order, ``gemm_split``), and matches numpy.

    Threshold 5 here: the experts with 13 and 5 tokens unpack (a partial last block), 0/2/4 do not.
    N = 208: 4 tiles of 4 vectors, the last one partial; 3 parts of 2 tiles leave a padding part."""
    if not _vnni():
        pytest.skip("needs AVX-512 VNNI")
    import dataclasses

    from moec.lower.kernels.factory import compile_kernel
    from moec.lower.kernels.grouped_gemm import GroupedGemmSpec
    from moec.lower.schedules import x86

    n, k, gs, counts, target = 208, 256, 64, [0, 13, 2, 5, 4], host_target()
    spec = GroupedGemmSpec(bits, n, k, gs, len(counts), x86.PARAMS.tile_for(n, bits, "int8"))
    outs = []
    stack, deq = expert_stack(bits, n, k, gs, len(counts), seed=bits + 7, activations="int8")
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    rng = np.random.default_rng(bits)
    x = rng.standard_normal((9, k)).astype(np.float32)
    rows = rng.integers(0, 9, int(offsets[-1])).astype(np.int32)
    for unpack, split in [(((bits, 5),), 3), ((), 1)]:
        params = dataclasses.replace(x86.PARAMS, gemm_unpack_tokens=unpack, gemm_split=split)
        mod = compile_kernel(x86.int8_grouped_gemm(spec, target, params), target)
        outs.append(call(mod, "grouped_gemm", [x, rows] + weight_args(stack)
                         + [offsets, np.full((len(rows), n), np.nan, np.float32)]))
    np.testing.assert_array_equal(outs[0], outs[1])
    xr = dequantized_activations(x, gs)[rows]
    assert_close(outs[0], np.concatenate([xr[offsets[e]:offsets[e + 1]] @ deq[e].T for e in range(len(counts))]))
