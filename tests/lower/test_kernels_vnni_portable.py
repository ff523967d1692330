"""The x86 int8-activation kernels (VNNI GEMV and grouped GEMM) with ``vpdpbusd`` and ``vpmultishiftqb``
written as plain TIR (``portable=True``): their indexing, layout tiles, task claiming and numerics checked
on every x86 host, also one without AVX-512 VNNI, where the kernels themselves cannot run (their tests in
``test_kernels_gemv.py`` and ``test_kernels_grouped_gemm.py`` are skipped there)."""

from __future__ import annotations

import platform

import numpy as np
import pytest
from tvm.target import codegen

from moec.lower.kernels.factory import compile_kernel, host_target
from moec.lower.kernels.gemv import GemvSpec
from moec.lower.kernels.grouped_gemm import GroupedGemmSpec
from moec.lower.kernels.layout import stack_kernel_layouts, to_kernel_layout
from moec.lower.schedules import x86
from moec.lower.schedules.x86_vnni import portable_dpbusd, portable_multishift, vnni_gemv
from moec.lower.schedules.x86_vnni_gemm import vnni_grouped_gemm
from moec.quant.packed_model import pack_weight

from kernel_helpers import (assert_close, call, check_dot, check_int8_gemv, check_int8_swiglu, run_int8_grouped_gemm,
                            weight_args)

pytestmark = pytest.mark.tvm

if platform.machine() != "x86_64":
    pytest.skip("an x86 host (the claimed-task loop uses lock bts)", allow_module_level=True)


def _packed(bits, n, k, gs, experts, seed):
    rng = np.random.default_rng(seed)
    return [pack_weight((rng.standard_normal((n, k)) * 0.1).astype(np.float32), bits, gs) for _ in range(experts)]


def _stack(pws, n, bits):
    return stack_kernel_layouts([to_kernel_layout(p, x86.PARAMS.tile_for(n, bits, "int8")) for p in pws])


def test_portable_dots_equal_the_instructions_semantics():
    """``portable_dpbusd`` against numpy (unsigned bytes times signed bytes, 4 per lane, added to acc), and the
    portable ``vpmultishiftqb`` against a per-byte reference."""
    from tvm.script import tirx as T
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, 64).astype(np.uint8)
    x4 = rng.integers(-128, 128, 64).astype(np.int8)
    acc = rng.integers(-1000, 1000, 16).astype(np.int32)

    check_dot(portable_dpbusd, codes, x4, acc, host_target(), "int8x64")

    ctrl = sum(o << (8 * j) for j, o in enumerate([0, 3, 6, 9, 32, 35, 38, 41]))
    data = rng.integers(0, 2**63, 8, dtype=np.uint64)
    shift = portable_multishift(ctrl)

    @T.prim_func
    def ms(d: T.Buffer((8,), "uint64"), out: T.Buffer((64,), "int8")):
        out[T.ramp(0, 1, 64)] = shift(None, T.reinterpret("int8x64", d[T.ramp(0, 1, 8)]))

    got = call(compile_kernel(ms, host_target()), "main", [data, np.zeros(64, np.int8)]).view(np.uint8)
    offs = [0, 3, 6, 9, 32, 35, 38, 41]
    want = np.array([(int(q) >> o) & 0xFF for q in data for o in offs], np.uint8)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n,per_expert", [(48, True), (1024, False)],
                         ids=["n48-partial-task", "n1024-claimed-tasks"])
def test_portable_vnni_gemv_matches_the_int8_reference(bits, n, per_expert):
    """N = 48: one task of 3 vectors (a partial task); N = 1024: 128-row tiles at 2/4 bits, 16 tasks taken by
    claiming (``lock bts``); an unrouted row is written 0."""
    k, gs, experts, top_k = 256, 64, 3, 2
    spec = GemvSpec(bits, n, k, gs, experts, top_k, x86.PARAMS.tile_for(n, bits, "int8"), per_expert)
    func = vnni_gemv(spec, x86.PARAMS, portable=True)
    assert ("atomic.bts" in func.script()) == (n == 1024)
    pws = _packed(bits, n, k, gs, experts, seed=bits)
    stack = _stack(pws, n, bits)
    check_int8_gemv(compile_kernel(func, host_target()), stack, pws, bits, gs, per_expert)


def test_portable_vnni_swiglu_gemv():
    """Gate and up from one ``[w1; w3]`` stack: ``silu(w1 x) * (w3 x)`` on the int8 activations."""
    n, k, gs, experts, top_k, bits = 64, 128, 32, 2, 2, 4
    w1, w3 = _packed(bits, n, k, gs, experts, 5), _packed(bits, n, k, gs, experts, 6)
    spec = GemvSpec(bits, n, k, gs, experts, top_k, x86.PARAMS.tile_for(n, bits, "int8"), swiglu=True)
    mod = compile_kernel(vnni_gemv(spec, x86.PARAMS, portable=True), host_target())
    check_int8_swiglu(mod, w1, w3, spec.tile, gs)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_portable_vnni_grouped_gemm_matches_the_int8_reference(bits):
    """13 pairs over 4 experts (an empty one; 3 bits: the 13-token expert unpacks its codes), N = 80: a
    partial task of 16-row vectors; 5 rows of x gathered by index."""
    n, k, gs, counts = 80, 256, 64, [3, 0, 9, 1]
    spec = GroupedGemmSpec(bits, n, k, gs, len(counts), x86.PARAMS.tile_for(n, bits, "int8"))
    mod = compile_kernel(vnni_grouped_gemm(spec, x86.PARAMS, portable=True), host_target())
    pws = _packed(bits, n, k, gs, len(counts), seed=bits + 9)
    out, ref, *_ = run_int8_grouped_gemm(mod, _stack(pws, n, bits), [p.dequantize() for p in pws], counts, gs, bits)
    assert_close(out, ref)


def test_portable_kernels_agree_with_the_instructions_where_the_host_has_them():
    """On an AVX-512 VNNI host: the portable GEMV's output equals the real kernel's bit for bit."""
    if not codegen.target_has_features("avx512vnni", host_target()):
        pytest.skip("needs AVX-512 VNNI")
    n, k, gs, experts, top_k = 128, 256, 64, 2, 2
    for bits in (2, 3, 4, 8):
        spec = GemvSpec(bits, n, k, gs, experts, top_k, x86.PARAMS.tile_for(n, bits, "int8"))
        stack = _stack(_packed(bits, n, k, gs, experts, 3), n, bits)
        x = np.random.default_rng(4).standard_normal((1, k)).astype(np.float32)
        args = [x] + weight_args(stack) + [np.array([1, 0], np.int32), np.zeros((top_k, n), np.float32)]
        outs = [call(compile_kernel(vnni_gemv(spec, x86.PARAMS, portable=p), host_target()), "gemv", list(args))
                for p in (False, True)]
        np.testing.assert_array_equal(outs[0], outs[1])
