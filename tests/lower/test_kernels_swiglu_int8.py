"""The int8-activation (x86 VNNI) SwiGLU GEMV: ``silu(w1 x) * (w3 x)`` in one call, against numpy and the unfused kernels."""

from __future__ import annotations

import numpy as np
import pytest
from tvm.target import codegen

from moec.core.errors import MoecError
from moec.lower.kernels.activations import dequantized_activations
from moec.lower.kernels.factory import host_target, make_gemv
from moec.lower.kernels.layout import stack_kernel_layouts, swiglu_weight, to_kernel_layout
from moec.lower.schedules import kernel_tile
from moec.quant.packed_model import pack_weight

from kernel_helpers import KernelCache, call

pytestmark = [pytest.mark.tvm, pytest.mark.skipif(
    not codegen.target_has_features("avx512vnni", host_target())
    or not codegen.target_has_features("avx512vbmi", host_target()), reason="host CPU lacks AVX-512 VNNI/VBMI")]


@pytest.fixture(scope="module")
def kernels():
    return KernelCache(host_target())


def _weights(bits, n, k, gs, experts, seed, scales="fp16"):
    """Packed w1 and w3 of ``experts`` random experts."""
    rng = np.random.default_rng(seed)
    return [[pack_weight((rng.standard_normal((n, k)) * 0.1).astype(np.float32), bits, gs, scales=scales)
             for _ in range(experts)] for _ in range(2)]


def _args(stack):
    keys = ["weight", "scale"] + (["super_scale"] if "super_scale" in stack else []) + ["zero"]
    return [stack[key] for key in keys]


def _stack(pws, n):
    """``n``: the kernel's output rows (a fused ``[w1; w3]`` has ``2n`` and ``w1``'s tile)."""
    return stack_kernel_layouts([to_kernel_layout(p, kernel_tile(host_target(), n, p.bits, "int8")) for p in pws])


def _fused(kernels, bits, n, k, gs, w1, w3, x, ids, separate_up, scales="fp16"):
    """The fused kernel's output for ``ids`` (rows pre-filled with 7: a -1 row must come back 0)."""
    top_k = len(ids)
    mod = kernels.get(make_gemv, bits, n, k, gs, len(w1), top_k, activations="int8", swiglu=True,
                      separate_up=separate_up, scales=scales, x_per_expert=len(x) > 1)
    weights = (_args(_stack(w1, n)) + _args(_stack(w3, n)) if separate_up
               else _args(_stack([swiglu_weight(a, b) for a, b in zip(w1, w3)], n)))
    return call(mod, "gemv", [x] + weights + [ids, np.full((top_k, n), 7, np.float32)])


# (bits, n, k, group_size, experts, top_k): 3 bits = the 3-word steps; 80 rows = a partial task tile of 8 vectors
CASES = [(2, 32, 128, 64, 3, 2), (3, 80, 192, 96, 3, 3), (4, 48, 128, 32, 4, 3), (8, 16, 64, 32, 2, 2)]


@pytest.mark.parametrize("separate_up", [True, False], ids=["separate", "stacked"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}n{c[1]}")
def test_int8_swiglu_matches_numpy(kernels, case, separate_up):
    bits, n, k, gs, experts, top_k = case
    w1, w3 = _weights(bits, n, k, gs, experts, seed=bits)
    rng = np.random.default_rng(bits + 10)
    x = rng.standard_normal((1, k)).astype(np.float32)
    ids = rng.choice(experts, top_k, replace=False).astype(np.int32)
    out = _fused(kernels, bits, n, k, gs, w1, w3, x, ids, separate_up)
    xr = dequantized_activations(x, gs)  # the kernel's own int8 activations: exact up to float rounding
    gate = np.stack([xr[0] @ w1[e].dequantize().T for e in ids])
    up = np.stack([xr[0] @ w3[e].dequantize().T for e in ids])
    ref = gate / (1 + np.exp(-gate)) * up
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


@pytest.mark.parametrize("bits", [3, 4])
def test_int8_swiglu_equals_the_unfused_kernels(kernels, bits):
    """Same int32 dot sums and group scaling as two unfused calls: only the SiLU epilogue's rounding differs."""
    n, k, gs, experts, top_k = 64, 256, 64, 4, 4
    w1, w3 = _weights(bits, n, k, gs, experts, seed=20 + bits)
    rng = np.random.default_rng(bits)
    x = rng.standard_normal((1, k)).astype(np.float32) * 3
    ids = np.array([3, -1, 0, 2], np.int32)
    out = _fused(kernels, bits, n, k, gs, w1, w3, x, ids, True)
    unfused = kernels.get(make_gemv, bits, n, k, gs, experts, top_k, activations="int8")
    gate, up = (call(unfused, "gemv", [x] + _args(_stack(w, n)) + [ids, np.zeros((top_k, n), np.float32)])
                for w in (w1, w3))
    rows = ids >= 0
    gate, up = gate.astype(np.float64)[rows], up.astype(np.float64)[rows]
    ref = gate / (1 + np.exp(-gate)) * up
    np.testing.assert_allclose(out[rows], ref, rtol=2e-6, atol=1e-6 * float(np.abs(ref).max()))
    assert (out[~rows] == 0).all()  # a row of another bit class is written 0: no mask needed before w2


def test_int8_swiglu_reads_only_routed_experts_and_zeroes_minus_one_rows(kernels):
    n, k, gs, experts = 32, 128, 32, 4
    w1, w3 = _weights(4, n, k, gs, experts, seed=3)
    for w in (w1[1], w3[1], w1[3], w3[3]):  # unrouted experts' scales: NaN would poison any row reading them
        w.scale[:] = np.nan
    x = np.random.default_rng(4).standard_normal((1, k)).astype(np.float32)
    out = _fused(kernels, 4, n, k, gs, w1, w3, x, np.array([-1, 2, 0], np.int32), True)
    assert np.isfinite(out).all() and (out[0] == 0).all() and (out[1:] != 0).any()
    out = _fused(kernels, 4, n, k, gs, w1, w3, x, np.full(3, -1, np.int32), True)
    assert (out == 0).all()


def test_int8_swiglu_u8_scales_and_per_expert_inputs(kernels):
    bits, n, k, gs, experts, top_k = 4, 32, 256, 32, 3, 2
    w1, w3 = _weights(bits, n, k, gs, experts, seed=8, scales="u8")
    x = np.random.default_rng(9).standard_normal((top_k, k)).astype(np.float32)
    ids = np.array([2, 0], np.int32)
    out = _fused(kernels, bits, n, k, gs, w1, w3, x, ids, True, scales="u8")
    xr = dequantized_activations(x, gs)
    gate = np.stack([xr[j] @ w1[e].dequantize().T for j, e in enumerate(ids)])
    up = np.stack([xr[j] @ w3[e].dequantize().T for j, e in enumerate(ids)])
    ref = gate / (1 + np.exp(-gate)) * up
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


def test_separate_up_needs_the_int8_swiglu_kernel():
    target = host_target()
    with pytest.raises(MoecError, match="separate w1/w3 stacks takes int8 activations only"):
        make_gemv(4, 64, 64, 32, 2, 1, target, swiglu=True, separate_up=True)
    with pytest.raises(MoecError, match="separate_up is a form of the SwiGLU GEMV"):
        make_gemv(4, 64, 64, 32, 2, 1, target, activations="int8", separate_up=True)
