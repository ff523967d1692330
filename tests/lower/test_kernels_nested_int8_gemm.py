"""Int8-activation nested prefill grouped GEMM (x86): each expert's run-time width against the integer
reference of the int8 nested GEMV, the stored width bit-identical to the fixed int8 grouped GEMM, planes a
width does not need never read, rows gathered, any task split. "x86": the kernel with its VNNI
instructions (hosts with AVX-512 VNNI); "x86-avx2": built for an AVX2 target (Haswell; hosts with AVX2, the
CI machine included); "x86-portable": the VNNI kernel with its instructions as plain TIR (any x86 host)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tvm

from moec.core.errors import MoecError
from moec.lower.kernels.activations import dequantized_activations
from moec.lower.kernels.factory import compile_kernel, host_target, make_grouped_gemm, make_nested_grouped_gemm
from moec.lower.kernels.layout import nested_kernel_layout, stack_kernel_layouts, to_kernel_layout
from moec.lower.kernels.nested_grouped import NestedGroupedSpec
from moec.lower.schedules import kernel_tile, x86
from moec.lower.schedules.x86_vnni_nested import vnni_nested_grouped_gemm
from moec.quant.nested import dequantize_nested, nest, segments_for
from moec.quant.packed_model import pack_weight

from kernel_helpers import assert_close, call
from test_kernels_nested_int8 import AVX2, VNNI, _reference, _target

pytestmark = [pytest.mark.tvm, pytest.mark.xdist_group("nested_int8_gemm")]

ISAS = ["x86", "x86-avx2", "x86-portable"]
_BUILT: dict[tuple, tvm.runtime.Module] = {}  # one build per (isa, shape, params) a process


def _kernel(isa, storage, n, k, gs, experts, params=None):
    target = _target(isa)
    key = (isa, storage, n, k, gs, experts, params)
    if key not in _BUILT:
        if isa != "x86-portable" and params is None:
            func = make_nested_grouped_gemm(storage, n, k, gs, experts, target, "int8", activations="int8")
        else:
            p = params or x86.PARAMS
            spec = NestedGroupedSpec(storage, n, k, gs, experts, p.tile_for(n, None, "int8"))  # = _tile
            func = vnni_nested_grouped_gemm(spec, p, portable=isa == "x86-portable")
        _BUILT[key] = compile_kernel(func, target)
    return _BUILT[key]


def _tile(isa, n):
    """The layout tile the kernel of ``isa`` reads (portable: the AVX-512 parameters it is built with, any host)."""
    return x86.PARAMS.tile_for(n, None, "int8") if isa == "x86-portable" else kernel_tile(_target(isa), n, None, "int8")


def _experts(storage, n, k, gs, experts, tile, seed):
    rng = np.random.default_rng(seed)
    pws = [pack_weight((rng.standard_normal((n, k)) * 0.1).astype(np.float32), storage, gs) for _ in range(experts)]
    nws = [nest(p) for p in pws]
    return pws, nws, stack_kernel_layouts([nested_kernel_layout(nw, tile) for nw in nws])


def _run(mod, stack, nsegs, x, rows, prec, offsets, n, dirty=None):
    segs = [stack[f"seg{s}"].copy() for s in range(nsegs)]
    for e, s0 in (dirty or {}).items():  # planes past expert e's width all ones: never read
        for s in range(s0, nsegs):
            segs[s][e] = 0xFFFFFFFF
    return call(mod, "grouped_gemm", [x, rows, *segs, stack["scale"], stack["zero"], np.asarray(prec, np.int32),
                                      offsets, np.full((len(rows), n), np.nan, np.float32)])


def _inputs(counts, k, xrows, seed):
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((xrows, k)).astype(np.float32)
    return x, rng.integers(0, xrows, int(offsets[-1])).astype(np.int32), offsets


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("storage", [8, 4])
def test_each_experts_run_time_width_against_the_integer_reference(isa, storage):
    """Token counts: an empty expert, one token, blocks with tails (4 tokens a block); 6 rows of x feed 14 pairs;
    N = 80 leaves the last 64-row tile part padding. Every width on every expert from one compiled kernel,
    with the planes a width skips set to garbage."""
    n, k, gs, counts = 80, 128, 32, [3, 0, 9, 1, 1]
    experts = len(counts)
    _, nws, stack = _experts(storage, n, k, gs, experts, _tile(isa, n), seed=storage)
    mod = _kernel(isa, storage, n, k, gs, experts)
    fmt = nws[0].format
    widths = fmt.derived_bits
    for i, prec in enumerate([[w] * experts for w in widths] + [[widths[e % len(widths)] for e in range(experts)]]):
        x, rows, offsets = _inputs(counts, k, 6, seed=10 + i)
        dirty = {e: segments_for(fmt, prec[e]) for e in range(experts)}
        y = _run(mod, stack, len(fmt.segment_bits), x, rows, prec, offsets, n, dirty)
        for e in range(experts):
            for p in range(offsets[e], offsets[e + 1]):
                np.testing.assert_allclose(y[p], _reference(nws[e], prec[e], x[rows[p]], gs), rtol=1e-5,
                                           atol=1e-6 * float(np.abs(y[p]).max()))
        xr = dequantized_activations(x, gs)[rows]
        assert_close(y, np.concatenate([xr[offsets[e]:offsets[e + 1]] @ dequantize_nested(nws[e], prec[e]).T
                                        for e in range(experts)]))


@pytest.mark.parametrize("isa", ["x86", "x86-avx2"])
@pytest.mark.parametrize("storage", [8, 4])
def test_stored_width_is_bit_identical_to_the_fixed_int8_grouped_gemm(isa, storage):
    """(AVX2: 8-bit codes recentred to signed bytes in both kernels, the zero point shifted to match.)"""
    n, k, gs, counts = 128, 256, 64, [5, 0, 7]
    experts = len(counts)
    pws, nws, stack = _experts(storage, n, k, gs, experts, _tile(isa, n), seed=20)
    nested = _kernel(isa, storage, n, k, gs, experts)
    target = _target(isa)
    fixed = compile_kernel(make_grouped_gemm(storage, n, k, gs, experts, target, activations="int8",
                                             layout_activations="int8"), target)
    fstack = stack_kernel_layouts([to_kernel_layout(p, kernel_tile(target, n, storage, "int8")) for p in pws])
    x, rows, offsets = _inputs(counts, k, 4, seed=21)
    want = call(fixed, "grouped_gemm", [x, rows, fstack["weight"], fstack["scale"], fstack["zero"], offsets,
                                        np.zeros((len(rows), n), np.float32)])
    got = _run(nested, stack, len(nws[0].segments), x, rows, [storage] * experts, offsets, n)
    np.testing.assert_array_equal(got, want)  # (the fixed AVX2 4-bit GEMM's int16 pair sums: the same integers)


def test_any_task_split_and_block_gives_the_same_output():
    """``gemm_split`` 1, 3 (a padding part) and 2; a task of a whole 64-row tile x 4 tokens, of a whole tile x 1
    token (``gemm_block`` 2 x 2: the nested task keeps its accumulator count on the whole tile) and of two
    tiles (8 vectors x 2 tokens, more than a tile holds: N = 192, three 64-row tiles, leaves the last such task
    half padding): the same integer sums, so bit-identical outputs (portable kernel: any x86 host)."""
    n, k, gs, counts = 192, 64, 32, [0, 13, 2, 5, 4]
    experts = len(counts)
    tile = x86.PARAMS.tile_for(n, None, "int8")
    assert tile == 64
    _, nws, stack = _experts(8, n, k, gs, experts, tile, seed=30)
    x, rows, offsets = _inputs(counts, k, 9, seed=31)
    prec = [8, 2, 3, 4, 8]
    outs = []
    for split, block, task in ((1, (4, 4), (4, 4)), (3, (2, 2), (4, 1)), (2, (8, 2), (8, 2))):
        params = dataclasses.replace(x86.PARAMS, gemm_split=split, gemm_vectors=block[0], gemm_tokens=block[1])
        assert params.nested_gemm_block(tile) == task
        outs.append(_run(_kernel("x86-portable", 8, n, k, gs, experts, params), stack, 4, x, rows, prec, offsets, n))
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])
    assert not np.isnan(outs[0]).any()
    avx2 = x86.gemv_params(AVX2)
    assert avx2.nested_gemm_block(avx2.tile_for(256, None, "int8")) == (4, 2)  # AVX2: a whole 32-row tile


def test_refusals():
    with pytest.raises(MoecError, match="AVX-512 target need avx512vnni"):
        no_vnni = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512", "mtriple": "x86_64-linux-gnu"})
        make_nested_grouped_gemm(8, 64, 128, 32, 2, no_vnni, "int8", activations="int8")
    with pytest.raises(MoecError, match="need AVX2"):
        make_nested_grouped_gemm(8, 64, 128, 32, 2, tvm.target.Target({"kind": "llvm", "mcpu": "nehalem"}),
                                 "int8", activations="int8")
    from moec.core.targets import load_target
    with pytest.raises(MoecError, match="no int8-activation nested grouped GEMM for target family 'arm'"):
        make_nested_grouped_gemm(8, 64, 128, 32, 2, load_target("raspberry-pi-5").tvm(), activations="int8")


def test_emits_vpdpbusd():
    if not VNNI:
        pytest.skip("needs AVX-512 VNNI")
    target = host_target()
    func = make_nested_grouped_gemm(8, 64, 128, 32, 2, target, "int8", activations="int8")
    asm = tvm.compile(tvm.IRModule({"grouped_gemm": func}), target=target).mod.inspect_source("asm")
    assert "vpdpbusd" in asm and "vpternlogd" in asm
