"""Kernels reading double-quantized (``u8``) scales: decode GEMV (x86 and ARM schedules), SwiGLU GEMV and
prefill grouped GEMM against numpy on the dequantized weights; the refusals (int8 activations, CUDA)."""

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
        tile = arm.PARAMS.tile_rows
        spec = GemvSpec(bits, n, k, gs, experts, top_k, tile, per_expert, scales="u8")
        mod = compile_kernel(arm.schedule_gemv(gemv_definition(spec), spec), target)
    else:
        tile = kernel_tile(target)
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
    stack = stack_kernel_layouts([to_kernel_layout(swiglu_weight(w1, w3), kernel_tile(target))])
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
    stack = stack_kernel_layouts([to_kernel_layout(p, kernel_tile(target)) for p in pws])
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    x = np.random.default_rng(2).standard_normal((int(offsets[-1]), k)).astype(np.float32)
    out = call(mod, "grouped_gemm", [x] + _args(stack) + [offsets, np.zeros((len(x), n), np.float32)])
    ref = np.concatenate([x[offsets[e]:offsets[e + 1]] @ pws[e].dequantize().T for e in range(len(counts))])
    assert_close(out, ref)


def test_u8_scales_refuse_int8_activations_and_unknown_formats():
    target = host_target()
    with pytest.raises(MoecError, match="float32-activation kernels only"):
        make_gemv(4, 32, 256, 32, 1, 1, target, activations="int8", scales="u8")
    with pytest.raises(MoecError, match="float32-activation kernels only"):
        make_grouped_gemm(4, 32, 256, 32, 1, target, activations="int8", scales="u8")
    with pytest.raises(MoecError, match="unknown scale format"):
        make_gemv(4, 32, 256, 32, 1, 1, target, scales="u4")
