"""ARM (NEON) schedules: numerics of the scheduled TIR on the host, and aarch64 codegen (NEON / sdot)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm

from moec.core.errors import MoecError
from moec.core.targets import load_target
from moec.lower.kernels.factory import compile_kernel, host_target, make_gemv
from moec.lower.kernels.layout import stack_kernel_layouts, to_kernel_layout
from moec.lower.kernels.gemv import GemvSpec, gemv_definition
from moec.lower.kernels.grouped_gemm import GroupedGemmSpec, grouped_gemm_definition
from moec.lower.kernels.layout import swiglu_weight
from moec.lower.schedules import arm, family_module, kernel_tile
from moec.quant.packed_model import pack_weight

from kernel_helpers import assert_close, call, weight_args

pytestmark = pytest.mark.tvm

TILE = arm.PARAMS.layout_tile


def _stack(bits, n, k, gs, experts, seed=0, swiglu=False):
    """(ARM kernel-layout stack, dequantized float32 weights [rows, k]) of random experts."""
    rng = np.random.default_rng(seed)
    ws = [(rng.standard_normal((n, k)) * 0.1).astype(np.float32) for _ in range(experts * (1 + swiglu))]
    if bits == 32:
        packed, deq = ws, ws
    else:
        packed = [pack_weight(w, bits, gs) for w in ws]
        deq = [p.dequantize() for p in packed]
    if swiglu:
        packed = [swiglu_weight(a, b) for a, b in zip(packed[:experts], packed[experts:])]
        deq = [np.concatenate([a, b]) for a, b in zip(deq[:experts], deq[experts:])]
    return stack_kernel_layouts([to_kernel_layout(p, TILE) for p in packed]), deq


# (n, k, gs, experts, top_k, x_per_expert): a partial task (36 rows), a partial layout tile,
# per-expert inputs, small groups.
SHAPES = [(36, 128, 32, 3, 2, False), (64, 256, 64, 4, 3, True), (48, 64, 16, 2, 1, False)]


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16, 32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "n{}k{}g{}e{}top{}".format(*s[:5]))
def test_arm_gemv_schedule_matches_numpy_on_host(bits, shape):
    """The ARM schedule is a target-neutral TIR transform: compiled for the host it must be exact."""
    n, k, gs, experts, top_k, per_expert = shape
    if bits == 3 and gs == 16:
        pytest.skip("3-bit kernels need group_size * 3 % 32 == 0")
    spec = GemvSpec(bits, n, k, gs, experts, top_k, TILE, per_expert)
    func = arm.schedule_gemv(gemv_definition(spec), spec)
    mod = compile_kernel(func, host_target())
    stack, deq = _stack(bits, n, k, gs, experts, seed=bits)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((top_k if per_expert else 1, k)).astype(np.float32)
    ids = rng.choice(experts, top_k, replace=False).astype(np.int32)
    out = call(mod, "gemv", [x] + weight_args(stack) + [ids, np.zeros((top_k, n), np.float32)])
    assert_close(out, np.stack([x[j if per_expert else 0] @ deq[e].T for j, e in enumerate(ids)]))


def test_arm_6_bit_gemv_on_host():
    """6-bit codes straddle words (group 16: 3 words per group) through the same NEON schedule."""
    test_arm_gemv_schedule_matches_numpy_on_host(6, SHAPES[2])


@pytest.mark.parametrize("bits", [4, 16])
def test_arm_swiglu_gemv_on_host(bits):
    n, k, gs, experts, top_k = 32, 64, 32, 3, 2
    spec = GemvSpec(bits, n, k, gs, experts, top_k, TILE, swiglu=True)
    mod = compile_kernel(arm.schedule_gemv(gemv_definition(spec), spec), host_target())
    stack, deq = _stack(bits, n, k, gs, experts, seed=3, swiglu=True)
    x = np.random.default_rng(1).standard_normal((1, k)).astype(np.float32)
    ids = np.array([2, 0], np.int32)
    out = call(mod, "gemv", [x] + weight_args(stack) + [ids, np.zeros((top_k, n), np.float32)])
    y = np.stack([x[0] @ deq[e].T for e in ids])
    gate, up = y[:, :n], y[:, n:]
    assert_close(out, gate / (1 + np.exp(-gate)) * up)


@pytest.mark.parametrize("bits", [3, 16])
def test_arm_grouped_gemm_on_host(bits):
    n, k, gs, counts = 24, 128, 32, [2, 0, 5]
    spec = GroupedGemmSpec(bits, n, k, gs, len(counts), TILE)
    mod = compile_kernel(grouped_gemm_definition(spec, arm.grouped_gemm_params()), host_target())
    stack, deq = _stack(bits, n, k, gs, len(counts), seed=5)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    x = np.random.default_rng(2).standard_normal((int(offsets[-1]), k)).astype(np.float32)
    out = call(mod, "grouped_gemm", [x] + weight_args(stack) + [offsets, np.zeros((len(x), n), np.float32)])
    assert_close(out, np.concatenate([x[offsets[e]:offsets[e + 1]] @ deq[e].T for e in range(len(counts))]))


def _asm(func, target) -> str:
    ex = tvm.compile(tvm.IRModule({"gemv": func}), target=target)
    return ex.mod.inspect_source("asm")


@pytest.mark.parametrize("preset", ["aarch64-generic", "raspberry-pi-5"])
def test_arm_family_is_picked_and_emits_neon(preset):
    target = load_target(preset).tvm()
    assert family_module(target) is arm and kernel_tile(target, 64, 4, "int8") == kernel_tile(target, 64, 4, "float32") == TILE
    asm = _asm(make_gemv(4, 64, 128, 32, 3, 2, target), target)
    assert re.search(r"^\s+fmla\s+v\d+\.4s", asm, re.M), "no 4-lane NEON fused multiply-add"
    assert re.search(r"^\s+ucvtf\s+v\d+\.4s", asm, re.M), "codes not converted 4 lanes at a time"


def test_arm_rejects_rows_not_a_multiple_of_a_vector():
    with pytest.raises(MoecError, match="multiple of 4 rows"):
        make_gemv(4, 30, 64, 32, 1, 1, load_target("aarch64-generic").tvm())


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape", [(36, 128, 32, 3, 2, True), (64, 256, 64, 4, 3, False)],
                         ids=lambda s: "n{}k{}g{}e{}top{}".format(*s[:5]))
def test_dotprod_gemv_indexing_on_host(bits, shape):
    """The sdot kernel with sdot swapped for the same dot in plain TIR: exact vs the int8 reference."""
    from moec.lower.kernels.activations import dequantized_activations
    from moec.lower.schedules.arm_dotprod import dotprod_gemv, portable_dot
    n, k, gs, experts, top_k, per_expert = shape
    spec = GemvSpec(bits, n, k, gs, experts, top_k, TILE, per_expert)
    mod = compile_kernel(dotprod_gemv(spec, arm.PARAMS, dot=portable_dot), host_target())
    stack, deq = _stack(bits, n, k, gs, experts, seed=bits)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((top_k if per_expert else 1, k)).astype(np.float32)
    ids = rng.choice(experts, top_k, replace=False).astype(np.int32)
    out = call(mod, "gemv", [x] + weight_args(stack) + [ids, np.zeros((top_k, n), np.float32)])
    xq = dequantized_activations(x, gs)
    assert_close(out, np.stack([xq[j if per_expert else 0] @ deq[e].T for j, e in enumerate(ids)]))


def test_dotprod_gemv_emits_sdot_for_raspberry_pi_5():
    target = load_target("raspberry-pi-5").tvm()
    asm = _asm(make_gemv(4, 64, 128, 32, 3, 2, target, activations="int8"), target)
    # 128 K values x 64 rows at 4 bits: 2 planes per word, 16 words of 4 rows per K pass.
    assert len(re.findall(r"^\s+sdot\s+v\d+\.4s", asm, re.M)) >= 16


def test_int8_activations_need_dotprod_and_supported_bits():
    with pytest.raises(MoecError, match="need the dotprod extension.*target aarch64-linux-gnu lacks it"):
        make_gemv(4, 64, 128, 32, 3, 2, load_target("aarch64-generic").tvm(), activations="int8")
    with pytest.raises(MoecError, match="no ARM int8-activation GEMV for 3-bit weights"):
        make_gemv(3, 64, 128, 32, 3, 2, load_target("raspberry-pi-5").tvm(), activations="int8")
