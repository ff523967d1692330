"""GFNI in the nested int8 kernels: ``vgf2p8affineqb`` moves each byte's high nibble down in one instruction
(``int8_common.gfni_nibble_down``) where a shift and an and did; outputs bit-identical to the kernels built for
the same target without GFNI (Cascade Lake: AVX-512 VNNI; Haswell: AVX2; each with ``+gfni`` against without)."""

from __future__ import annotations

import platform

import numpy as np
import pytest
import tvm
from tvm.script import tirx as T
from tvm.target import codegen

from moec.lower.kernels.factory import compile_kernel, host_target, make_nested_gemv, make_nested_grouped_gemm
from moec.lower.kernels.layout import nested_kernel_layout, stack_kernel_layouts
from moec.lower.schedules import kernel_tile
from moec.lower.schedules.int8_common import gfni_nibble_down, nibble_down_matrix
from moec.quant.nested import nest
from moec.quant.packed_model import pack_weight

from kernel_helpers import call

pytestmark = pytest.mark.tvm

HOST = host_target()
X86 = platform.machine() == "x86_64"
GFNI_AVX512 = X86 and all(codegen.target_has_features(f, HOST) for f in ("gfni", "avx512vnni"))
GFNI_AVX2 = X86 and all(codegen.target_has_features(f, HOST) for f in ("gfni", "avx2"))
# per vector width, a CPU without GFNI (AVX-512 VNNI: Cascade Lake; AVX2: Haswell); the same plus +gfni differs only there
BASE = {"avx512": "cascadelake", "avx2": "haswell"}


def _targets(width):
    """(with GFNI, without) for ``width``."""
    return (tvm.target.Target({"kind": "llvm", "mcpu": BASE[width], "mattr": ["+gfni"]}),
            tvm.target.Target({"kind": "llvm", "mcpu": BASE[width]}))


def _gf2p8affine(byte: int, matrix: int) -> int:
    """``gf2p8affineqb`` of one byte (Intel SDM): output bit ``i`` is the parity of ``byte`` and matrix byte ``7 − i``."""
    return sum((bin(byte & (matrix >> (8 * (7 - i)) & 0xFF)).count("1") & 1) << i for i in range(8))


@pytest.mark.parametrize("mask", [0xF, 0xE, 0xC, 0x8, 0x5])
def test_the_matrix_moves_the_high_nibble_down_under_the_mask(mask):
    """Every byte value, the masks of 4/3/2/1-bit codes (their low bits stale) and an odd one."""
    matrix = nibble_down_matrix(mask)
    assert [_gf2p8affine(b, matrix) for b in range(256)] == [(b >> 4) & mask for b in range(256)]


def test_a_mask_that_is_not_one_low_nibble_byte_is_refused():
    for mask in (0xF0F0F0F0, 0x0F0F0F0E, 0x1F1F1F1F):
        with pytest.raises(ValueError, match="nibble_down mask"):
            gfni_nibble_down(16)(None, mask)


@pytest.mark.parametrize("width", ["avx512", "avx2"])
def test_the_instruction_equals_shift_and_mask(width):
    if not (GFNI_AVX512 if width == "avx512" else GFNI_AVX2):
        pytest.skip(f"needs an x86 host with GFNI and {width}")
    lanes = 16 if width == "avx512" else 8
    target = _targets(width)[0]
    down = gfni_nibble_down(lanes)
    masks = (0x0F0F0F0F, 0x0E0E0E0E, 0x0C0C0C0C, 0x08080808)  # (written out below: TVMScript makes a tuple TIR)

    @T.prim_func
    def nibbles(w: T.Buffer((lanes,), "uint32"), out: T.Buffer((4, lanes), "uint32")):
        T.func_attr({"global_symbol": "nibbles", "tirx.noalias": True})
        out[0, T.ramp(0, 1, lanes)] = down(w[T.ramp(0, 1, lanes)], 0x0F0F0F0F)
        out[1, T.ramp(0, 1, lanes)] = down(w[T.ramp(0, 1, lanes)], 0x0E0E0E0E)
        out[2, T.ramp(0, 1, lanes)] = down(w[T.ramp(0, 1, lanes)], 0x0C0C0C0C)
        out[3, T.ramp(0, 1, lanes)] = down(w[T.ramp(0, 1, lanes)], 0x08080808)

    ex = tvm.compile(tvm.IRModule({"nibbles": nibbles}), target=target)
    assert "vgf2p8affineqb" in ex.mod.inspect_source("asm")
    w = np.random.default_rng(0).integers(0, 2**32, lanes, dtype=np.uint64).astype(np.uint32)
    out = call(ex.mod, "nibbles", [w, np.zeros((len(masks), lanes), np.uint32)])
    np.testing.assert_array_equal(out, [(w >> 4) & np.uint32(m) for m in masks])


def _stack(storage, n, k, gs, experts, tile):
    rng = np.random.default_rng(storage)
    nws = [nest(pack_weight((rng.standard_normal((n, k)) * 0.1).astype(np.float32), storage, gs))
           for _ in range(experts)]
    stack = stack_kernel_layouts([nested_kernel_layout(nw, tile) for nw in nws])
    return nws[0].format, [stack[f"seg{s}"] for s in range(len(nws[0].segments))] + [stack["scale"], stack["zero"]]


@pytest.mark.parametrize("width", ["avx512", "avx2"])
@pytest.mark.parametrize("storage", [8, 4])
def test_nested_gemv_and_grouped_gemm_are_bit_identical_with_and_without_gfni(width, storage):
    """Every run-time width of the decode GEMV (one chain a vector: odd lanes moved down) and the prefill grouped
    GEMM, built for a target with GFNI and one without, give the same bits; only the former has the instruction."""
    if not (GFNI_AVX512 if width == "avx512" else GFNI_AVX2):
        pytest.skip(f"needs an x86 host with GFNI and {width}")
    n, k, gs, experts, top_k = 128, 256, 64, 3, 2
    with_gf, without = _targets(width)
    tile = kernel_tile(with_gf, n, None, "int8")
    assert tile == kernel_tile(without, n, None, "int8")
    fmt, arrays = _stack(storage, n, k, gs, experts, tile)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, k)).astype(np.float32)
    xg = rng.standard_normal((5, k)).astype(np.float32)
    rows, offsets = np.array([0, 4, 1, 2, 3, 0], np.int32), np.array([0, 2, 2, 6], np.int32)
    outs = {}
    for target in (with_gf, without):
        gemv = tvm.compile(tvm.IRModule({"gemv": make_nested_gemv(storage, n, k, gs, experts, top_k, target,
                                                                    activations="int8")}), target=target)
        gemm = compile_kernel(make_nested_grouped_gemm(storage, n, k, gs, experts, target, "int8",
                                                       activations="int8"), target)
        has = "vgf2p8affineqb" in gemv.mod.inspect_source("asm")
        assert has == (target is with_gf)
        for w in fmt.derived_bits:
            prec = np.array([w, fmt.derived_bits[0], w], np.int32)
            outs.setdefault(w, []).append((
                call(gemv.mod, "gemv", [x, *arrays, prec, np.array([2, 0], np.int32), np.zeros((top_k, n), np.float32)]),
                call(gemm, "grouped_gemm", [xg, rows, *arrays, prec, offsets, np.zeros((len(rows), n), np.float32)])))
    for w, ((gv_gf, gm_gf), (gv, gm)) in outs.items():
        np.testing.assert_array_equal(gv_gf, gv, err_msg=f"GEMV at {w} bits")
        np.testing.assert_array_equal(gm_gf, gm, err_msg=f"grouped GEMM at {w} bits")
        assert np.abs(gv).max() > 0 and np.abs(gm).max() > 0
