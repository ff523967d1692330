"""Decode GEMV kernels (bit classes, float, int8 activations) vs ``x @ W.dequantize().T`` per routed expert."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import tvm
from tvm.target import codegen

from moec.core.errors import MoecError
from moec.lower.kernels.factory import compile_kernel, host_target, make_gemv
from moec.lower.kernels.layout import stack_kernel_layouts, to_kernel_layout
from moec.lower.schedules import kernel_tile, target_family, x86
from moec.lower.kernels.activations import dequantized_activations
from moec.lower.kernels.layout import swiglu_weight
from moec.lower.kernels.row_guard import zeroes_unrouted_rows
from moec.quant.packed_model import pack_weight

from kernel_helpers import KernelCache, assert_close, call, expert_stack, weight_args

pytestmark = pytest.mark.tvm

BITS = [2, 3, 4, 8, 16, 32]

# (n, k, group_size, experts, top_k, x_per_expert): one vector, a partial row tile (80 = 5
# vectors of 16, tiles of 4), several groups, per-expert inputs.
SHAPES = [
    (16, 64, 32, 2, 1, False),  # a single vector of rows, fewer than a tile
    (80, 256, 64, 5, 3, False),
    (48, 96, 32, 3, 2, True),
    (128, 512, 128, 8, 2, False),
    (208, 128, 32, 3, 2, True),  # 3 tiles of 64 + one of 16 rows
]


def _shape_id(shape) -> str:
    return "n{}k{}g{}e{}top{}{}".format(*shape[:5], "x" if shape[5] else "")


@pytest.fixture(scope="module")
def kernels():
    return KernelCache(host_target())


def _check(kernels, bits, n, k, gs, experts, top_k, x_per_expert, ids=None, seed=0,
           activations="float32"):
    mod = kernels.get(make_gemv, bits, n, k, gs, experts, top_k, x_per_expert=x_per_expert,
                      activations=activations)
    stack, deq = expert_stack(bits, n, k, gs, experts, seed=seed, activations=activations)
    rng = np.random.default_rng(seed + 1)
    x = rng.standard_normal((top_k if x_per_expert else 1, k)).astype(np.float32)
    if ids is None:
        ids = rng.choice(experts, top_k, replace=False)
    ids = np.asarray(ids, dtype=np.int32)
    out = call(mod, "gemv", [x] + weight_args(stack) + [ids, np.zeros((top_k, n), np.float32)])
    ref = np.stack([x[j if x_per_expert else 0] @ deq[e].T for j, e in enumerate(ids)])
    if activations == "int8":
        # Exact up to float rounding against the int8-rounded input; ~0.5% off the float result.
        np.testing.assert_allclose(out, ref, atol=3e-2 * float(np.abs(ref).max()))
        xq = dequantized_activations(x, gs)
        ref = np.stack([xq[j if x_per_expert else 0] @ deq[e].T for j, e in enumerate(ids)])
    assert_close(out, ref)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_gemv_matches_reference(kernels, bits, shape):
    _check(kernels, bits, *shape)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_int8_activation_gemv_matches_reference(kernels, bits, shape):
    if not codegen.target_has_features("avx512vnni", host_target()):
        pytest.skip("host CPU lacks AVX-512 VNNI")
    _check(kernels, bits, *shape, activations="int8")


@pytest.mark.parametrize("bits,shape", [(6, SHAPES[1]), (6, (48, 64, 16, 3, 2, True)), (5, SHAPES[2])],
                         ids=["6-" + _shape_id(SHAPES[1]), "6-g16", "5-" + _shape_id(SHAPES[2])])
def test_5_and_6_bit_gemv_matches_reference(kernels, bits, shape):
    """Codes straddling words (as at 3 bits); group 16 at 6 bits is 3 words per group."""
    _check(kernels, bits, *shape)


@pytest.mark.parametrize("bits", [3, 32])
def test_gemv_k_tail_and_repeated_expert(kernels, bits):
    k = 160 if bits == 3 else 100  # 3-bit: 5 groups of 32; float: 100 is not a multiple of 8
    _check(kernels, bits, 32, k, 32, 4, 3, False, ids=[2, 2, 0])


@pytest.mark.parametrize("bits,gs", [(2, 16), (4, 16), (8, 16), (4, 8), (8, 8)])
def test_gemv_small_groups(kernels, bits, gs):
    """Groups smaller than one 32-value step (the tiny test models use 16)."""
    _check(kernels, bits, 48, 64, gs, 3, 2, True)
    if codegen.target_has_features("avx512vnni", host_target()):
        _check(kernels, bits, 48, 64, gs, 3, 2, True, activations="int8")


@pytest.mark.parametrize("bits", [2, 16])
def test_gemv_reads_only_selected_experts(kernels, bits):
    """Unselected experts hold NaN/garbage: any read of them would poison the output."""
    n, k, gs, experts, top_k = 80, 256, 64, 5, 3
    mod = kernels.get(make_gemv, bits, n, k, gs, experts, top_k, x_per_expert=False)
    stack, deq = expert_stack(bits, n, k, gs, experts)
    ids = np.array([4, 1, 3], np.int32)
    for e in set(range(experts)) - set(ids.tolist()):
        if bits == 16:
            stack["weight"][e] = np.nan
        else:
            stack["scale"][e] = np.nan
    x = np.random.default_rng(3).standard_normal((1, k)).astype(np.float32)
    out = call(mod, "gemv", [x] + weight_args(stack) + [ids, np.zeros((top_k, n), np.float32)])
    assert_close(out, np.stack([x[0] @ deq[e].T for e in ids]))


@pytest.mark.parametrize("bits", [3, 4, 16, 32])
def test_swiglu_gemv(kernels, bits):
    """Gate and up projections in one pass: silu(w1 x) * (w3 x)."""
    n, k, gs, experts, top_k = 64, 128, 32, 3, 2  # n: a whole tile, so w3 starts one
    mod = kernels.get(make_gemv, bits, n, k, gs, experts, top_k, swiglu=True)
    rng = np.random.default_rng(bits)
    w1s, w3s = ([rng.standard_normal((n, k)).astype(np.float32) for _ in range(experts)] for _ in range(2))
    if bits == 32:
        fused, g_deq, u_deq = [swiglu_weight(a, b) for a, b in zip(w1s, w3s)], w1s, w3s
    else:
        p1 = [pack_weight(w, bits, gs) for w in w1s]
        p3 = [pack_weight(w, bits, gs) for w in w3s]
        fused = [swiglu_weight(a, b) for a, b in zip(p1, p3)]
        g_deq, u_deq = [p.dequantize() for p in p1], [p.dequantize() for p in p3]
    stack = stack_kernel_layouts([to_kernel_layout(w, kernel_tile(host_target(), n, bits, "float32")) for w in fused])
    x = rng.standard_normal((1, k)).astype(np.float32)
    ids = np.array([2, 0], np.int32)
    out = call(mod, "gemv", [x] + weight_args(stack) + [ids, np.zeros((top_k, n), np.float32)])
    gate = np.stack([x[0] @ g_deq[e].T for e in ids])
    up = np.stack([x[0] @ u_deq[e].T for e in ids])
    assert_close(out, gate / (1 + np.exp(-gate)) * up)


@pytest.mark.parametrize("activations", ["float32", "int8"])
@pytest.mark.parametrize("n", [80, 96, 192, 384])
def test_gemv_at_each_layout_tile(n, activations):
    """x86 lays a 4-bit weight out in tiles of the largest power-of-two divisor of N up to 128 rows
    (16, 32, 64, 128 here): the kernels index each, with tasks of 8 vectors spanning several tiles
    (16-64) or one (128)."""
    if activations == "int8" and not codegen.target_has_features("avx512vnni", host_target()):
        pytest.skip("host CPU lacks AVX-512 VNNI")
    target = host_target()
    k, gs, experts, top_k = 128, 32, 3, 2
    mod = compile_kernel(make_gemv(4, n, k, gs, experts, top_k, target, activations=activations), target)
    weights = np.random.default_rng(7).standard_normal((experts, n, k), dtype=np.float32)
    pws = [pack_weight(w, 4, gs) for w in weights]
    stack = stack_kernel_layouts([to_kernel_layout(p, tile=kernel_tile(target, n, 4, activations)) for p in pws])
    x = np.random.default_rng(8).standard_normal((1, k)).astype(np.float32)
    if activations == "int8":
        x = dequantized_activations(x, gs)  # already on the int8 grid: the kernel reproduces it
    ids = np.array([2, 0], np.int32)
    out = call(mod, "gemv", [x] + weight_args(stack) + [ids, np.zeros((top_k, n), np.float32)])
    assert_close(out, np.stack([x[0] @ pws[e].dequantize().T for e in ids]))


@pytest.mark.parametrize("bits", [2, 4])
def test_vnni_plane_masks_match_shifted_planes(monkeypatch, bits):
    """Odd code planes masked in place (``int8_plane_masks``, their chain shifted once a group) give
    the shifted-plane kernel's output bit for bit (negative activations, every zero point)."""
    if not codegen.target_has_features("avx512vnni", host_target()):
        pytest.skip("host CPU lacks AVX-512 VNNI")
    n, k, gs, experts, top_k = 48, 256, 64, 3, 2
    stack, _ = expert_stack(bits, n, k, gs, experts, seed=3, activations="int8")
    x = np.random.default_rng(4).standard_normal((1, k)).astype(np.float32) * 5
    outs = []
    for masks in (False, True):
        monkeypatch.setattr(x86, "PARAMS", dataclasses.replace(x86.PARAMS, int8_plane_masks=masks))
        mod = compile_kernel(make_gemv(bits, n, k, gs, experts, top_k, host_target(), activations="int8"),
                             host_target())
        outs.append(call(mod, "gemv", [x] + weight_args(stack) + [np.array([2, 0], np.int32),
                                                                    np.zeros((top_k, n), np.float32)]))
    np.testing.assert_array_equal(outs[1], outs[0])
    assert np.abs(outs[0]).max() > 0


@pytest.mark.parametrize("threads", [1, 2])
def test_vnni_claimed_tasks_match_the_static_split(monkeypatch, threads):
    """Tasks taken with ``lock bts`` (``int8_claim_lanes``), in tile-major or expert-major claim order
    (``int8_expert_major_claims``), give TVM's static split's output bit for bit, on one thread and on two
    (unrouted rows included); a call with fewer tasks than lanes keeps the split."""
    if not codegen.target_has_features("avx512vnni", host_target()):
        pytest.skip("host CPU lacks AVX-512 VNNI")
    from moec.runtime.session import use_threads

    n, k, gs, experts, top_k = 1024, 64, 32, 6, 4  # 64 vectors: 8 tiles x 4 routed rows = 32 tasks
    stack, _ = expert_stack(4, n, k, gs, experts, seed=5, activations="int8")
    x = np.random.default_rng(6).standard_normal((1, k)).astype(np.float32)
    ids = np.array([3, -1, 0, 5], np.int32)
    outs, scripts = [], []
    for lanes, expert_major in ((0, True), (16, True), (16, False)):
        monkeypatch.setattr(x86, "PARAMS", dataclasses.replace(x86.PARAMS, int8_claim_lanes=lanes,
                                                                int8_expert_major_claims=expert_major))
        func = make_gemv(4, n, k, gs, experts, top_k, host_target(), activations="int8")
        scripts.append(func.script())
        mod = compile_kernel(func, host_target())
        use_threads(threads)
        outs.append(call(mod, "gemv", [x] + weight_args(stack) + [ids, np.zeros((top_k, n), np.float32)]))
    assert "atomic.bts" not in scripts[0] and "atomic.bts" in scripts[1] and scripts[1] != scripts[2]
    np.testing.assert_array_equal(outs[1], outs[0])
    np.testing.assert_array_equal(outs[2], outs[0])
    assert not outs[0][1].any() and np.abs(outs[0][0]).max() > 0
    small = make_gemv(4, 64, k, gs, experts, 1, host_target(), activations="int8")  # 1 task < 16 lanes
    assert "atomic.bts" not in small.script()


@pytest.mark.parametrize("n", [16, 256])
def test_x86_schedule_keeps_register_tile(n):
    """The decode loop nest is (value: unrolled 32, vector: unrolled, lane: vectorised) over 4 vectors
    of 16 rows (8 on a host without AVX-512: ``avx2_lanes``), so 4 independent accumulators share each
    broadcast of x (a regression once left 1). Within a tile of a task's rows or more the vectors come
    as one vectorised loop (LLVM splits it into 4 registers)."""
    p = x86.gemv_params(host_target())
    lines = make_gemv(2, n, 256, 64, 4, 2, host_target()).script().splitlines()
    at = next(i for i, line in enumerate(lines) if 'T.sblock("qdot_update")' in line)
    loops = [line.strip() for line in lines[:at] if line.strip().startswith("for ")][-3:]
    unrolled, lanes = (int(re.search(r"\((\d+)\)", loops[i]).group(1)) for i in (1, 2))
    assert "T.unroll(32)" in loops[0] and "T.unroll" in loops[1] and "T.vectorized" in loops[2], loops
    assert lanes % p.lanes == 0 and unrolled * lanes == p.lanes * min(p.tile_vectors, n // p.lanes), loops


@pytest.mark.parametrize("bits", [2, 3, 8, 32])
def test_x86_float_gemv_on_8_lane_vectors(monkeypatch, bits):
    """The float32-activation GEMV scheduled for 8-lane vectors (AVX2, ``avx2_lanes``) on whatever host runs
    the tests: N = 48 (6 vectors: a task and a half) and 16 against numpy."""
    import dataclasses

    from moec.lower.kernels.gemv import GemvSpec, gemv_definition
    from moec.lower.kernels.row_guard import guard_routed_rows
    params = dataclasses.replace(x86.PARAMS, lanes=8)
    for n in (48, 16):
        k, gs, experts, top_k = 128, 32, 3, 2
        spec = GemvSpec(bits, n, k, gs, experts, top_k, x86.PARAMS.tile_for(n, bits, "float32"))
        mod = compile_kernel(guard_routed_rows(x86.schedule_gemv(gemv_definition(spec), spec, params), top_k),
                             host_target())
        stack, deq = expert_stack(bits, n, k, gs, experts, seed=n)
        x = np.random.default_rng(2).standard_normal((1, k)).astype(np.float32)
        ids = np.array([2, 0], np.int32)
        out = call(mod, "gemv", [x] + weight_args(stack) + [ids, np.zeros((top_k, n), np.float32)])
        assert_close(out, np.stack([x[0] @ deq[e].T for e in ids]))


def test_x86_float_gemv_lanes_follow_the_target():
    """16 lanes (AVX-512 registers) where the target has AVX-512, ``avx2_lanes`` (8) where it does not."""
    import tvm
    avx512 = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512", "mtriple": "x86_64-linux-gnu"})
    avx2 = tvm.target.Target({"kind": "llvm", "mcpu": "haswell", "mtriple": "x86_64-linux-gnu"})
    assert x86.gemv_params(avx512).lanes == 16 and x86.gemv_params(avx2).lanes == x86.PARAMS.avx2_lanes == 8
    for target, lanes in ((avx512, 16), (avx2, 8)):
        script = make_gemv(4, 64, 128, 32, 2, 1, target).script()
        assert f"T.vectorized({lanes})" in script or f"T.vectorized({4 * lanes})" in script


def test_a_spec_with_another_tile_is_refused_in_one_line():
    """A layout tile the schedule does not pick for that weight is a MoecError, fixed and nested alike."""
    from moec.lower.kernels.gemv import GemvSpec
    from moec.lower.kernels.nested_gemv import NestedGemvSpec
    from moec.lower.schedules import cpu_gemv
    with pytest.raises(MoecError, match="tile 16 does not match the x86 int8 .* 128 rows for N = 1024 and 4-bit codes"):
        cpu_gemv.check_spec(GemvSpec(4, 1024, 128, 32, 2, 1, 16), x86.PARAMS, "int8")
    with pytest.raises(MoecError, match="tile 128 does not match the x86 float32 .* 16 rows for N = 1024"):
        cpu_gemv.check_spec(GemvSpec(4, 1024, 128, 32, 2, 1, 128), x86.PARAMS, "float32")
    with pytest.raises(MoecError, match="tile 32 does not match .* 16 rows for N = 64 and a nested stack"):
        cpu_gemv.check_spec(NestedGemvSpec(8, 64, 128, 32, 2, 1, 32), x86.PARAMS, "float32")


def test_unsupported_shapes_raise_clear_errors():
    target = host_target()
    with pytest.raises(MoecError, match="multiple of 16 rows"):  # on 16- and on 8-lane vectors (AVX2)
        make_gemv(4, 40, 64, 32, 2, 1, target)
    with pytest.raises(MoecError, match="group_size"):
        make_gemv(3, 64, 64, 16, 2, 1, target)
    with pytest.raises(MoecError, match="no kernel for 7-bit"):
        make_gemv(7, 64, 64, 32, 2, 1, target)
    with pytest.raises(MoecError, match="int8 activations need quantized weights: bits 2, 3, 4, 8, not 6"):
        make_gemv(6, 64, 64, 32, 2, 1, target, activations="int8")
    with pytest.raises(MoecError, match="top_k"):
        make_gemv(4, 64, 64, 32, 2, 0, target)
    with pytest.raises(MoecError, match="int8 activations need quantized weights"):
        make_gemv(16, 64, 64, 32, 2, 1, target, activations="int8")
    with pytest.raises(MoecError, match="unknown activations 'fp8'"):
        make_gemv(4, 64, 64, 32, 2, 1, target, activations="fp8")
    no_vnni = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512", "mtriple": "x86_64-linux-gnu"})
    with pytest.raises(MoecError, match="AVX-512 target need avx512vnni, which .* lacks"):
        make_gemv(4, 64, 64, 32, 2, 1, no_vnni, activations="int8")


def test_target_family_registry():
    assert target_family(host_target()) == "x86"
    x86_64 = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "icelake-server"})
    # int8 activations at 2 and 4 bits: the largest power-of-two divisor of N up to 128 rows, no padded
    # tiles (gpt-oss's 2880: 64)
    assert [kernel_tile(x86_64, n, 4, "int8") for n in (1024, 2880, 304, 96)] == [128, 64, 16, 32]
    # 3-bit, 8-bit and float weights: 16-row tiles; nested stacks: an 8-vector task of the int8 nested GEMV
    # (128 rows; the largest power-of-two divisor of N up to that: 2880 -> 64, 304 -> 16, 96 -> 32)
    assert [kernel_tile(x86_64, 1024, b, "int8") for b in (2, 3, 8, 16, None)] == [128, 16, 16, 16, 128]
    assert [kernel_tile(x86_64, n, None, "int8") for n in (2880, 304, 96)] == [64, 16, 32]
    # float32 activations: 16-row tiles at every width (the float GEMV's 4-vector task on a 128-row
    # tile read half of each tile's rows: 4 bits 34 % slower on an AVX2 host)
    assert [kernel_tile(x86_64, 1024, b, "float32") for b in (2, 3, 4, 8, 16, None)] == [16] * 6
    with pytest.raises(MoecError, match="internal: tile_for needs activations"):
        kernel_tile(x86_64, 1024, 4, "fp8")
    # AVX2 (no AVX-512): 2- and 4-bit int8 tiles are one task of the AVX2 GEMV (4 vectors of 8 rows)
    avx2 = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v3"})
    assert [kernel_tile(avx2, n, 4, "int8") for n in (1024, 2880, 304)] == [32, 32, 16]
    assert [kernel_tile(avx2, 1024, b, "float32") for b in (2, 4, 8, None)] == [16] * 4
    assert target_family(tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu"})) == "arm"
    riscv = tvm.target.Target({"kind": "llvm", "mtriple": "riscv64-linux-gnu"})
    with pytest.raises(MoecError, match="family 'riscv'; choices: arm, x86"):
        make_gemv(4, 64, 64, 32, 2, 1, riscv)


@pytest.mark.parametrize("activations", ["float32", "int8"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
def test_rows_with_negative_id_do_no_work(kernels, bits, activations):
    """A -1 row (routed to another bit class) reads no weight and leaves its output row untouched, or writes it 0
    where the kernel says so (``moec.row_zero``: the x86 int8 GEMVs); others are exact."""
    if activations == "int8" and (bits == 16 or not codegen.target_has_features("avx512vnni", host_target())):
        pytest.skip("int8 activations need quantized weights and AVX-512 VNNI")
    n, k, gs, experts, top_k = 80, 256, 64, 5, 3
    func = make_gemv(bits, n, k, gs, experts, top_k, host_target(), activations=activations)
    assert func.attrs["moec.row_guard"]
    skipped = 0.0 if zeroes_unrouted_rows(func) else 1234.5
    assert zeroes_unrouted_rows(func) == (activations == "int8")
    mod = kernels.get(make_gemv, bits, n, k, gs, experts, top_k, activations=activations)
    stack, deq = expert_stack(bits, n, k, gs, experts, activations=activations)
    x = np.random.default_rng(5).standard_normal((1, k)).astype(np.float32)
    ids = np.array([-1, 3, -1], np.int32)
    sentinel = np.full((top_k, n), 1234.5, np.float32)
    out = call(mod, "gemv", [x] + weight_args(stack) + [ids, sentinel])
    assert (out[[0, 2]] == skipped).all()
    xr = dequantized_activations(x, gs) if activations == "int8" else x
    ref = xr[0] @ deq[3].T
    np.testing.assert_allclose(out[1], ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))
    out = call(mod, "gemv", [x] + weight_args(stack) + [np.full(top_k, -1, np.int32), sentinel.copy()])
    assert (out == skipped).all()
