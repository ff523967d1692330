"""The x86 int8-activation GEMV on AVX2 (``x86_avx2``): its dots against numpy, the kernel against the int8
reference at every width it takes, built for an AVX2 target (Haswell: no AVX-512) and run on this host.
(The nested AVX2 kernel is tested with the other int8 nested kernels, ``test_kernels_nested_int8.py``.)"""

from __future__ import annotations

import dataclasses
import platform
import re

import numpy as np
import pytest
import tvm
from tvm.target import codegen

from moec.core.errors import MoecError
from moec.lower.kernel_linear import KernelEmitter
from moec.lower.kernels.activations import dequantized_activations
from moec.lower.kernels.factory import compile_kernel, host_target, make_gemv, make_grouped_gemm, make_nested_gemv
from moec.lower.kernels.layout import stack_kernel_layouts, to_kernel_layout
from moec.lower.schedules import kernel_tile, x86
from moec.lower.schedules.x86_avx2 import dot, pairs, quads
from moec.quant.packed_model import pack_weight

from kernel_helpers import call, check_dot, check_int8_gemv, check_int8_swiglu, run_int8_grouped_gemm, weight_args

pytestmark = pytest.mark.tvm

if platform.machine() != "x86_64" or not codegen.target_has_features("avx2", host_target()):
    pytest.skip("an x86 host with AVX2", allow_module_level=True)

AVX2 = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})


def _packed(bits, n, k, gs, experts, seed):
    rng = np.random.default_rng(seed)
    return [pack_weight((rng.standard_normal((n, k)) * 0.1).astype(np.float32), bits, gs) for _ in range(experts)]


def _stack(pws, n, bits):
    return stack_kernel_layouts([to_kernel_layout(p, kernel_tile(AVX2, n, bits, "int8")) for p in pws])


def test_avx2_dot_equals_four_byte_products():
    """Signed codes -128..127 (the extremes included) times activations -127..127: pair sums up to 32512,
    no saturation."""
    rng = np.random.default_rng(0)
    codes = rng.integers(-128, 128, 32).astype(np.int8)
    codes[:8] = -128
    x4 = rng.integers(-127, 128, 32).astype(np.int8)
    x4[:4], x4[4:8] = -127, 127
    check_dot(dot, codes, x4, rng.integers(-1000, 1000, 8).astype(np.int32), AVX2, "uint32x8")


@pytest.mark.parametrize("weight", [1, 16])
def test_avx2_eight_int16_pair_sums_are_exact(weight):
    """8 ``pairs`` of codes 0..15 added in int16 then ``quads`` times ``weight``: the exact int32 sum, the first
    lanes at the int16 bound (8 · 2 · 15 · -127 = -30480)."""
    from tvm.script import tirx as T
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 16, (8, 32)).astype(np.int8)
    x = rng.integers(-127, 128, (8, 32)).astype(np.int8)
    codes[:, :8], x[:, :8] = 15, -127

    def widened(c, xb):
        p = [pairs(T.reinterpret("uint32x8", c[i, T.ramp(0, 1, 32)]), xb[i, T.ramp(0, 1, 32)]) for i in range(8)]
        return quads(sum(p[1:], p[0]), weight)

    @T.prim_func
    def kernel(c: T.Buffer((8, 32), "int8"), xb: T.Buffer((8, 32), "int8"), out: T.Buffer((8,), "int32")):
        out[T.ramp(0, 1, 8)] = widened(c, xb)

    got = call(compile_kernel(kernel, AVX2), "main", [codes, x, np.zeros(8, np.int32)])
    want = weight * (codes.astype(np.int64) * x).reshape(8, 8, 4).sum((0, 2))
    assert (want[:2] == 2 * -30480 * weight).all()  # each of the lane's two int16 sums at -30480
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("n,per_expert", [(48, True), (1024, False)], ids=["n48-partial-task", "n1024-claimed"])
def test_avx2_gemv_matches_the_int8_reference(bits, n, per_expert):
    """N = 48: one partial task; N = 1024: tiles of one task (32 rows at 2/4 bits), claimed tasks; an unrouted
    row is written 0."""
    k, gs, experts, top_k = 256, 64, 3, 2
    func = make_gemv(bits, n, k, gs, experts, top_k, AVX2, x_per_expert=per_expert, activations="int8")
    assert ("atomic.bts" in func.script()) == (n == 1024)
    pws = _packed(bits, n, k, gs, experts, seed=bits)
    check_int8_gemv(compile_kernel(func, AVX2), _stack(pws, n, bits), pws, bits, gs, per_expert)


def test_avx2_gemv_extreme_codes_do_not_saturate():
    """8-bit codes at 0 and 255 (recentred to -128 and 127) against activations at ±127: every pair sum at
    its bound; the kernel's output equals the exact integer sum."""
    n, k, gs, experts = 16, 64, 64, 1
    w = np.where(np.arange(k) % 2 == 0, 1.0, -1.0)[None].repeat(n, 0).astype(np.float32)
    w[:, :4] = 1.0
    pw = pack_weight(w, 8, gs)
    assert pw.dequantize().min() < 0 < pw.dequantize().max()
    x = np.where(np.arange(k) % 2 == 0, 1.0, -1.0)[None].astype(np.float32)
    func = make_gemv(8, n, k, gs, experts, 1, AVX2, activations="int8")
    out = call(compile_kernel(func, AVX2), "gemv",
               [x] + weight_args(_stack([pw], n, 8)) + [np.array([0], np.int32), np.zeros((1, n), np.float32)])
    np.testing.assert_allclose(out[0], dequantized_activations(x, gs)[0] @ pw.dequantize().T.astype(np.float64),
                               rtol=1e-5)


def test_avx2_swiglu_gemv():
    """Gate and up from one ``[w1; w3]`` stack (u8 scales: ``test_kernels_double_quant.py``)."""
    n, k, gs, experts, top_k, bits = 64, 128, 32, 2, 2, 4
    w1, w3 = _packed(bits, n, k, gs, experts, 5), _packed(bits, n, k, gs, experts, 6)
    mod = compile_kernel(make_gemv(bits, n, k, gs, experts, top_k, AVX2, swiglu=True, activations="int8"), AVX2)
    tile = kernel_tile(AVX2, n, bits, "int8")
    check_int8_swiglu(mod, w1, w3, tile, gs)

def test_avx2_claimed_tasks_match_the_static_split(monkeypatch):
    """The same call with claimed tasks (16 lanes) and TVM's static split: equal bit for bit."""
    n, k, gs, experts, top_k, bits = 512, 128, 64, 3, 3, 4
    pws = _packed(bits, n, k, gs, experts, 9)
    x = np.random.default_rng(10).standard_normal((1, k)).astype(np.float32)
    args = [x] + weight_args(_stack(pws, n, bits)) + [np.array([2, -1, 0], np.int32)]
    outs = []
    for lanes in (0, 16):
        monkeypatch.setattr(x86, "PARAMS", dataclasses.replace(x86.PARAMS, int8_claim_lanes=lanes))
        func = make_gemv(bits, n, k, gs, experts, top_k, AVX2, activations="int8")
        assert ("atomic.bts" in func.script()) == (lanes > 0)
        outs.append(call(compile_kernel(func, AVX2), "gemv", args + [np.zeros((top_k, n), np.float32)]))
    assert np.array_equal(outs[0], outs[1])


def test_avx2_build_emits_avx2_dots_and_no_avx512():
    """The AVX2 build's dots are ``vpmaddubsw`` + ``vpmaddwd`` on ymm registers (8-bit: ``vpsignb`` too), no zmm."""
    for bits, sign in ((4, False), (8, True)):
        func = make_gemv(bits, 64, 256, 64, 2, 1, AVX2, activations="int8")
        asm = tvm.compile(tvm.IRModule({"gemv": func}), target=AVX2).mod.inspect_source("asm")
        assert len(re.findall(r"vpmaddubsw\s+%ymm", asm)) >= 4  # a step: 4 vectors x planes
        assert re.search(r"vpmaddwd\s+", asm) and "zmm" not in asm and "vpdpbusd" not in asm
        assert bool(re.search(r"vpsignb\s+", asm)) == sign


def test_avx2_widths_and_targets():
    """3-bit fixed weights have no AVX2 int8 GEMV nor grouped GEMM (one-line error; ``auto`` keeps them on
    float32); the nested kernel serves 3-bit widths; 2/4-bit tiles are one task's rows;
    no AVX2: no int8 kernel."""
    with pytest.raises(MoecError, match="3-bit int8 activations need avx512vnni, avx512vbmi.*AVX2 kernels take 2, 4, 8"):
        make_gemv(3, 64, 256, 64, 2, 1, AVX2, activations="int8")
    with pytest.raises(MoecError, match="3-bit int8 activations need avx512vnni, avx512vbmi.*take 2, 4, 8"):
        make_grouped_gemm(3, 64, 256, 64, 2, AVX2, activations="int8")
    make_nested_gemv(8, 64, 256, 64, 2, 1, AVX2, activations="int8")
    p = x86.gemv_params(AVX2)
    assert p.lanes == 8 and kernel_tile(AVX2, 1024, 4, "int8") == p.lanes * p.avx2_int8_tile_vectors
    assert kernel_tile(AVX2, 1024, 4, "float32") == 16 and kernel_tile(AVX2, 1024, 8, "int8") == 16
    emitter = KernelEmitter(AVX2)
    assert emitter.activations == "int8"
    assert [emitter._acts(b) for b in (2, 3, 4, 8)] == ["int8", "float32", "int8", "int8"]
    assert [emitter._builds_int8(make_grouped_gemm, b) for b in (2, 3, 4, 8)] == [True, False, True, True]
    sse = tvm.target.Target({"kind": "llvm", "mcpu": "nehalem"})
    with pytest.raises(MoecError, match="need AVX2"):
        make_gemv(4, 64, 256, 64, 2, 1, sse, activations="int8")
    assert KernelEmitter(sse).activations == "float32"


def test_avx512_without_vnni_is_refused_in_one_line():
    """Skylake-SP (AVX-512F/BW, no VNNI): 16-lane parameters, no int8 kernel; ``auto`` keeps float32."""
    skx = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})
    with pytest.raises(MoecError, match="on an AVX-512 target need avx512vnni"):
        make_gemv(4, 64, 256, 64, 2, 1, skx, activations="int8")
    with pytest.raises(MoecError, match="on an AVX-512 target need avx512vnni"):
        make_nested_gemv(8, 64, 256, 64, 2, 1, skx, activations="int8")
    assert KernelEmitter(skx).activations == "float32"


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_avx2_grouped_gemm_equals_the_decode_gemv_per_token(bits):
    """The AVX2 int8 prefill GEMM: 13 pairs over 4 experts (an empty one), 5 rows of x gathered by index, N = 48
    (a partial tile at 2/4 bits) against the int8 reference, and each pair's row bit for bit the AVX2 decode
    GEMV's for that token and expert (the same integer sums and group scaling)."""
    n, k, gs, counts = 48, 256, 64, [3, 0, 9, 1]
    gemm = compile_kernel(make_grouped_gemm(bits, n, k, gs, len(counts), AVX2, activations="int8"), AVX2)
    gemv = compile_kernel(make_gemv(bits, n, k, gs, len(counts), 1, AVX2, activations="int8"), AVX2)
    pws = _packed(bits, n, k, gs, len(counts), seed=bits + 11)
    stack = _stack(pws, n, bits)
    out, ref, x, rows, offsets = run_int8_grouped_gemm(gemm, stack, [p.dequantize() for p in pws], counts, gs, bits)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    for e in range(len(counts)):
        for p in range(offsets[e], offsets[e + 1]):
            y = call(gemv, "gemv", [x[rows[p]][None], stack["weight"], stack["scale"], stack["zero"],
                                    np.asarray([e], np.int32), np.zeros((1, n), np.float32)])
            assert np.array_equal(out[p], y[0])
