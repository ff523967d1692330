"""Nested prefill grouped GEMM: each expert's width is a run-time argument; numerics against the derived
weights (numpy) at every width with garbage in the planes a width does not need, x86 and ARM loops."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm

from moec.core.errors import MoecError
from moec.core.targets import load_target
from moec.lower.kernels.factory import compile_kernel, host_target, make_nested_grouped_gemm
from moec.lower.kernels.layout import nested_kernel_layout, stack_kernel_layouts
from moec.lower.kernels.nested_grouped import NestedGroupedSpec, nested_grouped_definition
from moec.lower.schedules import arm, kernel_tile
from moec.quant.nested import dequantize_nested, nest, segments_for
from moec.quant.packed_model import pack_weight

from kernel_helpers import assert_close, call

pytestmark = pytest.mark.tvm


def _experts(storage, n, k, gs, experts, tile, seed=0):
    rng = np.random.default_rng(seed)
    nws = [nest(pack_weight((rng.standard_normal((n, k)) * 0.1).astype(np.float32), storage, gs))
           for _ in range(experts)]
    return nws, stack_kernel_layouts([nested_kernel_layout(nw, tile) for nw in nws])


def _check(mod, nws, stack, prec, counts, seed):
    """One call at widths ``prec`` (planes past each expert's width all ones) against numpy."""
    n, k = nws[0].shape
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    x = np.random.default_rng(seed).standard_normal((int(offsets[-1]), k)).astype(np.float32)
    segs = [stack[f"seg{s}"].copy() for s in range(len(nws[0].segments))]
    for e, bits in enumerate(prec):
        for s in range(segments_for(nws[0].format, bits), len(segs)):
            segs[s][e] = 0xFFFFFFFF  # never read: the output must not change
    y = call(mod, "grouped_gemm", [x, *segs, stack["scale"], stack["zero"], np.asarray(prec, np.int32), offsets,
                                   np.zeros((len(x), n), np.float32)])
    ref = np.concatenate([x[offsets[e]:offsets[e + 1]] @ dequantize_nested(nws[e], prec[e]).T
                          for e in range(len(nws))])
    assert_close(y, ref)


@pytest.mark.parametrize("storage", [8, 4])
def test_nested_grouped_gemm_serves_each_experts_width_with_unneeded_planes_garbage(storage):
    n, k, gs, experts = 80, 128, 64, 4
    nws, stack = _experts(storage, n, k, gs, experts, kernel_tile(host_target(), n, None, "float32"))
    mod = compile_kernel(make_nested_grouped_gemm(storage, n, k, gs, experts, host_target()), host_target())
    widths = nws[0].format.derived_bits
    # token counts: an empty expert, one token, blocks with tails (4 tokens a block)
    counts = [3, 0, 9, 1]
    for w in widths:  # every width on every expert, one compiled kernel: the width is only an argument
        _check(mod, nws, stack, [w] * experts, counts, seed=w)
    _check(mod, nws, stack, [widths[e % len(widths)] for e in range(experts)], counts, seed=11)
    _check(mod, nws, stack, [widths[-1 - e % len(widths)] for e in range(experts)], [1, 6, 0, 17], seed=12)


@pytest.mark.parametrize("tile", [32, 64])
def test_a_task_runs_every_vector_of_its_tile(tile):
    """Tiles of several 16-row vectors (the int8 nested GEMV's layout: 64 rows on AVX-512, 32 on AVX2) are one
    task each, their vectors one after another within each group; N = 80 leaves the last tile part padding
    (rows 80.. of 96 or 128), which is neither read into an output nor written."""
    from moec.lower.schedules import x86

    n, k, gs, experts = 80, 128, 64, 3
    spec = NestedGroupedSpec(8, n, k, gs, experts, tile)
    mod = compile_kernel(nested_grouped_definition(spec, x86.grouped_gemm_params()), host_target())
    nws, stack = _experts(8, n, k, gs, experts, tile, seed=4)
    assert stack["seg0"].shape[1] == -(-n // tile)
    _check(mod, nws, stack, [8, 2, 4], [5, 0, 9], seed=5)
    _check(mod, nws, stack, [3, 8, 2], [1, 7, 2], seed=6)


def test_arm_nested_grouped_loops_on_host_and_neon_codegen():
    n, k, gs, experts = 32, 64, 32, 3
    spec = NestedGroupedSpec(8, n, k, gs, experts, arm.PARAMS.tile_for(n, None, "float32"))
    func = nested_grouped_definition(spec, arm.grouped_gemm_params())
    nws, stack = _experts(8, n, k, gs, experts, arm.PARAMS.tile_for(n, None, "float32"), seed=2)
    _check(compile_kernel(func, host_target()), nws, stack, [8, 3, 2], [2, 5, 1], seed=3)
    target = load_target("raspberry-pi-5").tvm()
    asm = tvm.compile(tvm.IRModule({"grouped_gemm": make_nested_grouped_gemm(8, n, k, gs, experts, target)}),
                      target=target).mod.inspect_source("asm")
    assert re.search(r"^\s+fmla\s+v\d+\.4s", asm, re.M), "no 4-lane NEON fused multiply-add"


def test_nested_grouped_shape_errors():
    with pytest.raises(MoecError, match="multiple of 32"):
        make_nested_grouped_gemm(8, 64, 128, 16, 2, host_target())
    with pytest.raises(MoecError, match="no nested storage at 3 bits"):
        make_nested_grouped_gemm(3, 64, 128, 32, 2, host_target())
    with pytest.raises(MoecError, match="multiples of 16 rows"):
        make_nested_grouped_gemm(8, 40, 128, 32, 2, host_target())
