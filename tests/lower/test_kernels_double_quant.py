"""Kernels reading double-quantized (``u8``) scales against numpy on the dequantized weights: decode GEMV
(x86 and ARM schedules), SwiGLU GEMV and prefill grouped GEMM with float32 activations; the int8-activation
GEMVs (x86 VNNI and AVX2, ARM sdot run on the host through its portable dot) and the VNNI and AVX2 grouped GEMMs."""

from __future__ import annotations

import numpy as np
import pytest

from moec.core.errors import MoecError
from moec.lower.kernels.factory import compile_kernel, host_target, make_gemv, make_grouped_gemm
from moec.lower.kernels.gemv import GemvSpec, gemv_definition
from moec.lower.kernels.layout import from_kernel_layout, stack_kernel_layouts, swiglu_weight, to_kernel_layout
from moec.lower.schedules import arm, kernel_tile
from moec.quant.packed_model import pack_weight

from kernel_helpers import assert_close, call

pytestmark = pytest.mark.tvm


def _weights(bits, n, k, gs, experts, seed=0):
    rng = np.random.default_rng(seed)
    ws = [(rng.standard_normal((n, k)) * 0.1 * (1 + rng.random((n, 1)) * 4)).astype(np.float32)
          for _ in range(experts)]
    return [pack_weight(w, bits, gs, "mse", scales="u8") for w in ws]


def _args(stack):
    return [stack["weight"], stack["scale"], stack["super_scale"], stack["zero"]]


def test_layout_round_trips_and_keeps_codes():
    pw = _weights(4, 48, 512, 32, 1)[0]
    lay = to_kernel_layout(pw, 16)
    assert lay["scale"].dtype == np.uint8 and lay["super_scale"].dtype == np.float16
    assert lay["super_scale"].shape == (3, 2, 16)  # 16 groups of a row: 2 super-blocks of 8
    back = from_kernel_layout(lay, 4, pw.shape, 32, "u8")
    for a in ("packed", "scale", "zero", "super_scale"):
        np.testing.assert_array_equal(getattr(back, a), getattr(pw, a))


# (bits, n, k, gs, experts, top_k, x_per_expert): G = 8 (one super-block), 12 (a partial one), 2.
CASES = [(4, 48, 256, 32, 3, 2, False), (3, 32, 384, 32, 2, 2, True), (2, 16, 128, 64, 2, 1, False),
         (8, 32, 256, 32, 2, 2, False)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}n{}k{}g{}".format(*c[:4]))
@pytest.mark.parametrize("family", ["host", "arm"])
def test_gemv_reads_u8_scales(case, family):
    bits, n, k, gs, experts, top_k, per_expert = case
    target = host_target()
    if family == "arm":
        tile = arm.PARAMS.tile_for(n, bits, "float32")
        spec = GemvSpec(bits, n, k, gs, experts, top_k, tile, per_expert, scales="u8")
        mod = compile_kernel(arm.schedule_gemv(gemv_definition(spec), spec), target)
    else:
        tile = kernel_tile(target, n, bits, "float32")
        mod = compile_kernel(make_gemv(bits, n, k, gs, experts, top_k, target, x_per_expert=per_expert,
                                       scales="u8"), target)
    pws = _weights(bits, n, k, gs, experts, seed=bits)
    stack = stack_kernel_layouts([to_kernel_layout(p, tile) for p in pws])
    rng = np.random.default_rng(3)
    x = rng.standard_normal((top_k if per_expert else 1, k)).astype(np.float32)
    ids = rng.choice(experts, top_k, replace=False).astype(np.int32)
    out = call(mod, "gemv", [x] + _args(stack) + [ids, np.zeros((top_k, n), np.float32)])
    assert_close(out, np.stack([x[j if per_expert else 0] @ pws[e].dequantize().T for j, e in enumerate(ids)]))


def test_swiglu_gemv_reads_u8_scales():
    target = host_target()
    n, k, gs = 32, 256, 32
    w1, w3 = _weights(4, n, k, gs, 2, seed=5)
    mod = compile_kernel(make_gemv(4, n, k, gs, 1, 1, target, swiglu=True, scales="u8"), target)
    stack = stack_kernel_layouts([to_kernel_layout(swiglu_weight(w1, w3), kernel_tile(target, n, 4, "float32"))])
    x = np.random.default_rng(1).standard_normal((1, k)).astype(np.float32)
    out = call(mod, "gemv", [x] + _args(stack) + [np.zeros(1, np.int32), np.zeros((1, n), np.float32)])
    g, u = x @ w1.dequantize().T, x @ w3.dequantize().T
    assert_close(out, g / (1 + np.exp(-g)) * u)


@pytest.mark.parametrize("bits", [3, 4])
def test_grouped_gemm_reads_u8_scales(bits):
    target = host_target()
    n, k, gs, counts = 48, 384, 32, [3, 0, 6]
    mod = compile_kernel(make_grouped_gemm(bits, n, k, gs, len(counts), target, scales="u8"), target)
    pws = _weights(bits, n, k, gs, len(counts), seed=9)
    stack = stack_kernel_layouts([to_kernel_layout(p, kernel_tile(target, n, bits, "float32")) for p in pws])
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    x = np.random.default_rng(2).standard_normal((int(offsets[-1]), k)).astype(np.float32)
    out = call(mod, "grouped_gemm", [x] + _args(stack) + [offsets, np.zeros((len(x), n), np.float32)])
    ref = np.concatenate([x[offsets[e]:offsets[e + 1]] @ pws[e].dequantize().T for e in range(len(counts))])
    assert_close(out, ref)


def _avx2_target(bits: int, kernel: str):
    """Haswell (AVX2, no AVX-512), whose kernels run on this host; skips where the host lacks AVX2 or at 3 bits."""
    import platform

    import tvm
    from tvm.target import codegen
    if platform.machine() != "x86_64" or not codegen.target_has_features("avx2", host_target()):
        pytest.skip("no AVX2 on this host")
    if bits == 3:
        pytest.skip(f"the AVX2 {kernel} has no 3-bit path")
    return tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})


def _vnni():
    from tvm.target import codegen
    return codegen.target_has_features("avx512vnni", host_target())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("family", ["x86-vnni", "x86-avx2", "x86-portable", "arm-dotprod"])
def test_int8_activation_gemv_reads_u8_scales(bits, family):
    """int8 activations: exact against the int8-rounded input times the dequantized weights."""
    from moec.lower.kernels.activations import dequantized_activations
    from moec.lower.schedules.arm_dotprod import dotprod_gemv, portable_dot
    target = host_target()
    n, k, gs, experts, top_k, per_expert = 48, 384, 32, 3, 2, bits == 4
    if family == "x86-vnni":
        if not _vnni():
            pytest.skip("no AVX-512 VNNI on this host")
        tile = kernel_tile(target, n, bits, "int8")
        func = make_gemv(bits, n, k, gs, experts, top_k, target, x_per_expert=per_expert, activations="int8",
                         scales="u8")
    elif family == "x86-avx2":
        target = _avx2_target(bits, "GEMV")
        tile = kernel_tile(target, n, bits, "int8")
        func = make_gemv(bits, n, k, gs, experts, top_k, target, x_per_expert=per_expert, activations="int8",
                         scales="u8")
    elif family == "x86-portable":  # vpdpbusd / vpmultishiftqb as plain TIR: runs on any x86 host
        from moec.lower.schedules import x86
        from moec.lower.schedules.x86_vnni import vnni_gemv
        tile = kernel_tile(target, n, bits, "int8")
        func = vnni_gemv(GemvSpec(bits, n, k, gs, experts, top_k, tile, per_expert, scales="u8"), x86.PARAMS,
                         portable=True)
    else:
        if bits == 3:
            pytest.skip("the sdot GEMV has no 3-bit path")
        tile = arm.PARAMS.tile_for(n, bits, "int8")
        spec = GemvSpec(bits, n, k, gs, experts, top_k, tile, per_expert, scales="u8")
        func = dotprod_gemv(spec, arm.PARAMS, dot=portable_dot)  # sdot as plain TIR: runs on the host
    mod = compile_kernel(func, target)
    pws = _weights(bits, n, k, gs, experts, seed=bits + 20)
    stack = stack_kernel_layouts([to_kernel_layout(p, tile) for p in pws])
    rng = np.random.default_rng(4)
    x = rng.standard_normal((top_k if per_expert else 1, k)).astype(np.float32)
    ids = np.array([2, 0], np.int32)
    out = call(mod, "gemv", [x] + _args(stack) + [ids, np.zeros((top_k, n), np.float32)])
    xq = dequantized_activations(x, gs)
    assert_close(out, np.stack([xq[j if per_expert else 0] @ pws[e].dequantize().T for j, e in enumerate(ids)]))


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("family", ["x86-vnni", "x86-avx2"])
def test_int8_activation_grouped_gemm_reads_u8_scales(bits, family):
    from moec.lower.kernels.activations import dequantized_activations
    target = host_target()
    if family == "x86-vnni" and not _vnni():
        pytest.skip("no AVX-512 VNNI on this host")
    if family == "x86-avx2":
        target = _avx2_target(bits, "grouped GEMM")
    n, k, gs, counts = 48, 384, 32, [3, 0, 6]
    mod = compile_kernel(make_grouped_gemm(bits, n, k, gs, len(counts), target, activations="int8", scales="u8"),
                         target)
    pws = _weights(bits, n, k, gs, len(counts), seed=bits + 30)
    stack = stack_kernel_layouts([to_kernel_layout(p, kernel_tile(target, n, bits, "int8")) for p in pws])
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((5, k)).astype(np.float32)
    rows = rng.integers(0, 5, int(offsets[-1])).astype(np.int32)  # the pair -> token row gather
    out = call(mod, "grouped_gemm", [x, rows] + _args(stack) + [offsets, np.zeros((len(rows), n), np.float32)])
    xq = dequantized_activations(x, gs)[rows]
    ref = np.concatenate([xq[offsets[e]:offsets[e + 1]] @ pws[e].dequantize().T for e in range(len(counts))])
    assert_close(out, ref)


def test_unknown_scale_formats_are_refused():
    with pytest.raises(MoecError, match="unknown scale format"):
        make_gemv(4, 32, 256, 32, 1, 1, host_target(), scales="u4")


def test_u8_scales_compile_for_aarch64_with_sdot():
    """The ARM int8 GEMV with u8 scales compiles for the Raspberry Pi 5 and still uses sdot."""
    import re

    import tvm
    from moec.core.targets import load_target
    target = load_target("raspberry-pi-5").tvm()
    func = make_gemv(4, 64, 256, 32, 3, 2, target, activations="int8", scales="u8")
    asm = tvm.compile(tvm.IRModule({"gemv": func}), target=target).mod.inspect_source("asm")
    assert len(re.findall(r"^\s+sdot\s+v\d+\.4s", asm, re.M)) >= 16
