"""Int8-activation nested GEMVs (x86 VNNI, ARM dotprod): every derived width against an integer reference of
the int8 activations, the stored width bit-identical to the fixed int8 kernel, skipped planes never loaded.

Each test runs the x86 kernel with its VNNI instructions where the host has them ("x86"), the x86 kernel
built for an AVX2 target (Haswell, ``x86_avx2``) where the host has AVX2 ("x86-avx2"), and everywhere
the same VNNI kernel with its instructions as plain TIR ("x86-portable") and the ARM kernel with ``sdot`` as
plain TIR ("arm-portable"); the ARM kernel's real ``sdot`` runs on the emulated arm64 device
(``tests/hardware``) and its codegen is checked below."""

from __future__ import annotations

import platform
import re

import numpy as np
import pytest
import tvm
from tvm.target import codegen

from moec.core.errors import MoecError
from moec.core.targets import load_target
from moec.lower.bundler import require_nested_activations
from moec.lower.kernels.activations import dequantized_activations, quantize_activations
from moec.lower.kernels.factory import compile_kernel, host_target, make_gemv, make_nested_gemv
from moec.lower.kernels.gemv import GemvSpec
from moec.lower.kernels.layout import nested_kernel_layout, stack_kernel_layouts, to_kernel_layout
from moec.lower.kernels.nested_gemv import NestedGemvSpec
from moec.lower.schedules import arm, kernel_tile, x86
from moec.lower.schedules.arm_dotprod import dotprod_gemv, portable_dot
from moec.lower.schedules.arm_dotprod_nested import dotprod_nested_gemv
from moec.lower.schedules.x86_vnni_nested import vnni_nested_gemv
from moec.quant.nested import dequantize_nested, derived_codes, nest
from moec.quant.packed_model import pack_weight

from kernel_helpers import assert_close, call

pytestmark = pytest.mark.tvm

VNNI = codegen.target_has_features("avx512vnni", host_target())
HAS_AVX2 = platform.machine() == "x86_64" and codegen.target_has_features("avx2", host_target())
AVX2 = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
ISAS = ["x86", "x86-avx2", "x86-portable", "arm-portable"]


def _target(isa):
    """The target an x86 kernel is built for (``x86-avx2``: Haswell, needs an AVX2 host); skips if the host lacks it."""
    if isa == "x86" and not VNNI:
        pytest.skip("needs AVX-512 VNNI")
    if isa == "x86-avx2" and not HAS_AVX2:
        pytest.skip("needs an x86 host with AVX2")
    return AVX2 if isa == "x86-avx2" else host_target()


def _tile(isa, n):
    if isa == "arm-portable":
        return arm.PARAMS.tile_for(n, None, "int8")
    return kernel_tile(AVX2 if isa == "x86-avx2" else host_target(), n, None, "int8")


def _nested_kernel(isa, storage, n, k, gs, experts, top_k, x_per_expert=False, swiglu=False):
    """The compiled int8 nested GEMV of ``isa`` for the host (``swiglu``: its SwiGLU form)."""
    if isa in ("x86", "x86-avx2"):
        target = _target(isa)
        func = make_nested_gemv(storage, n, k, gs, experts, top_k, target, x_per_expert=x_per_expert,
                                activations="int8", swiglu=swiglu)
        return compile_kernel(func, target)
    else:
        spec = NestedGemvSpec(storage, n, k, gs, experts, top_k, _tile(isa, n), x_per_expert, swiglu)
        func = (vnni_nested_gemv(spec, x86.PARAMS, portable=True) if isa == "x86-portable"
                else dotprod_nested_gemv(spec, arm.PARAMS, dot=portable_dot))
    return compile_kernel(func, host_target())


def _experts(storage, n, k, gs, experts, seed=0, isa="x86"):
    rng = np.random.default_rng(seed)
    pws = [pack_weight((rng.standard_normal((n, k)) * 0.1).astype(np.float32), storage, gs) for _ in range(experts)]
    nws = [nest(p) for p in pws]
    tile = _tile(isa, n)
    return pws, nws, stack_kernel_layouts([nested_kernel_layout(nw, tile) for nw in nws])


def _stack_args(nws, stack):
    return [stack[f"seg{s}"] for s in range(len(nws[0].segments))] + [stack["scale"], stack["zero"]]


def _run(mod, nws, stack, x, prec, ids, n, up_stack=None):
    """``mod`` on ``stack`` (and, for a SwiGLU kernel, ``up_stack`` after it)."""
    ups = _stack_args(nws, up_stack) if up_stack is not None else []
    y = np.full((len(ids), n), 7.0, np.float32)
    return call(mod, "gemv", [x, *_stack_args(nws, stack), *ups, np.asarray(prec, np.int32),
                              np.asarray(ids, np.int32), y])


def _reference(nw, bits, x, gs):
    """``sum_g scale·sx·(sum (q_k << s)·x8 − (zero − (2**s − 1)/2)·xsum)`` in float64 (module docstring)."""
    x8, sx = quantize_activations(x[None], gs)
    n, k = nw.shape
    s = nw.storage_bits - bits
    q = derived_codes(nw, bits).astype(np.int64) << s
    dots = (q.reshape(n, -1, gs) * x8.reshape(1, -1, gs).astype(np.int64)).sum(-1)
    xsum = x8.reshape(-1, gs).astype(np.int64).sum(-1)
    zero = nw.zeros().astype(np.float64) - ((1 << s) - 1) / 2
    terms = nw.scale.astype(np.float64) * sx[0].astype(np.float64) * (dots - zero * xsum)
    return terms.sum(-1)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("storage,per_expert", [(8, False), (4, True)])
def test_int8_nested_gemv_serves_each_width_at_run_time(isa, storage, per_expert):
    n, k, gs, experts, top_k = 64, 128, 32, 4, 3
    _, nws, stack = _experts(storage, n, k, gs, experts, isa=isa)
    mod = _nested_kernel(isa, storage, n, k, gs, experts, top_k, per_expert)
    x = np.random.default_rng(1).standard_normal((top_k if per_expert else 1, k)).astype(np.float32)
    widths = nws[0].format.derived_bits
    for prec in ([widths[e % len(widths)] for e in range(experts)], [widths[0]] * experts,
                 [widths[-1 - (e % 2)] for e in range(experts)]):
        ids = [3, -1, 1]
        y = _run(mod, nws, stack, x, prec, ids, n)
        for r, e in enumerate(ids):
            if e < 0:
                assert (y[r] == 7.0).all()  # row guard: nothing computed or read
                continue
            xr = x[r if per_expert else 0]
            np.testing.assert_allclose(y[r], _reference(nws[e], prec[e], xr, gs), rtol=1e-5,
                                       atol=1e-6 * float(np.abs(y[r]).max()))
            # and the derived weight times the activations the int8 kernels see
            assert_close(y[r], dequantize_nested(nws[e], prec[e]) @ dequantized_activations(xr[None], gs)[0])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("storage,per_expert", [(8, False), (4, True)])
def test_int8_nested_swiglu_is_silu_of_the_gate_times_the_up(isa, storage, per_expert):
    """The SwiGLU form reads the gate's and the up's stacks at each routed expert's one run-time width:
    ``silu(gate) * up`` of the plain kernel's two outputs (whose every width is checked above)."""
    n, k, gs, experts, top_k = 64, 128, 32, 4, 3
    _, nws, gate = _experts(storage, n, k, gs, experts, seed=6, isa=isa)
    _, _, up = _experts(storage, n, k, gs, experts, seed=7, isa=isa)
    plain = _nested_kernel(isa, storage, n, k, gs, experts, top_k, per_expert)
    fused = _nested_kernel(isa, storage, n, k, gs, experts, top_k, per_expert, swiglu=True)
    x = np.random.default_rng(8).standard_normal((top_k if per_expert else 1, k)).astype(np.float32) * 4
    widths = nws[0].format.derived_bits
    for prec in ([widths[e % len(widths)] for e in range(experts)], [widths[-1 - (e % 2)] for e in range(experts)]):
        ids = [3, -1, 0]
        y = _run(fused, nws, gate, x, prec, ids, n, up_stack=up)
        g = _run(plain, nws, gate, x, prec, ids, n).astype(np.float64)
        u = _run(plain, nws, up, x, prec, ids, n).astype(np.float64)
        assert (y[1] == 7.0).all()  # row guard: an id of -1 computes and writes nothing
        assert np.abs(g[[0, 2]]).max() > 1  # silu far from linear on some rows
        want = (g / (1 + np.exp(-g)) * u)[[0, 2]]
        np.testing.assert_allclose(y[[0, 2]], want, rtol=1e-5, atol=1e-6 * float(np.abs(want).max()))


def test_nested_swiglu_needs_int8_activations():
    with pytest.raises(MoecError, match="int8 activations"):
        make_nested_gemv(8, 64, 128, 32, 4, 2, host_target(), swiglu=True)


@pytest.mark.parametrize("isa", ["x86", "x86-avx2", "arm-portable"])
@pytest.mark.parametrize("storage", [8, 4])
def test_stored_width_is_bit_identical_to_the_fixed_int8_kernel(isa, storage):
    """(ARM and AVX2: 8-bit codes recentred to signed bytes in both kernels, the zero point shifted to match.)"""
    n, k, gs, experts = 64, 256, 64, 3
    pws, nws, stack = _experts(storage, n, k, gs, experts, seed=4, isa=isa)
    target = host_target() if isa == "arm-portable" else _target(isa)
    nested = _nested_kernel(isa, storage, n, k, gs, experts, 2)
    if isa != "arm-portable":
        fixed = compile_kernel(make_gemv(storage, n, k, gs, experts, 2, target, activations="int8"), target)
        ftile = kernel_tile(target, n, storage, "int8")
    else:
        ftile = arm.PARAMS.tile_for(n, storage, "int8")
        spec = GemvSpec(storage, n, k, gs, experts, 2, ftile)
        fixed = compile_kernel(dotprod_gemv(spec, arm.PARAMS, dot=portable_dot), target)
    fstack = stack_kernel_layouts([to_kernel_layout(p, ftile) for p in pws])
    x = np.random.default_rng(5).standard_normal((1, k)).astype(np.float32)
    ids = np.asarray([2, 0], np.int32)
    want = call(fixed, "gemv", [x, fstack["weight"], fstack["scale"], fstack["zero"], ids,
                                np.zeros((2, n), np.float32)])
    got = _run(nested, nws, stack, x, [storage] * experts, ids, n)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("isa", ISAS)
def test_int8_unneeded_planes_are_never_loaded(isa):
    n, k, gs, experts = 32, 64, 32, 2
    _, nws, stack = _experts(8, n, k, gs, experts, isa=isa)
    mod = _nested_kernel(isa, 8, n, k, gs, experts, 1)
    x = np.random.default_rng(2).standard_normal((1, k)).astype(np.float32)
    for prec, dirty_from in (([2, 2], 1), ([3, 3], 2), ([4, 4], 3)):
        dirty = dict(stack)
        for s in range(dirty_from, 4):
            dirty[f"seg{s}"] = np.full_like(stack[f"seg{s}"], 0xFFFFFFFF)
        assert np.array_equal(_run(mod, nws, dirty, x, prec, [0], n), _run(mod, nws, stack, x, prec, [0], n))


def test_adjacent_one_bit_segments_are_read_as_one_pair():
    """8-bit storage (segments 2+1+1+4): 4 bits read seg0 and the pair (seg1, seg2), 3 bits seg0 and seg1
    alone, 8 bits the top three as at 4 bits then the low nibble segment; 4-bit storage (2+1+1) the same
    pair. The numerics of every width through the pairs: the kernel tests above (vs integer references)."""
    from moec.lower.schedules.int8_nested import nibble_parts
    from moec.core.formats import get_nested_format

    f8, f4 = get_nested_format(8), get_nested_format(4)
    assert nibble_parts(f8, range(3)) == [(0,), (1, 2)]
    assert nibble_parts(f8, range(2)) == [(0,), (1,)]
    assert nibble_parts(f8, range(1)) == [(0,)]
    assert nibble_parts(f8, [0, 1, 2]) == nibble_parts(f4, range(3)) == [(0,), (1, 2)]
    assert nibble_parts(f8, [3]) == [(3,)]


def test_int8_nested_shape_errors():
    if VNNI:
        with pytest.raises(MoecError, match="multiples of 16"):
            make_nested_gemv(8, 40, 128, 32, 2, 1, host_target(), activations="int8")
    with pytest.raises(MoecError, match="multiples of 16"):
        vnni_nested_gemv(NestedGemvSpec(8, 40, 128, 32, 2, 1, 16), x86.PARAMS, portable=True)
    with pytest.raises(MoecError, match="group_size .* a multiple of 32"):
        dotprod_nested_gemv(NestedGemvSpec(8, 64, 128, 16, 2, 1, 16), arm.PARAMS)
    with pytest.raises(MoecError, match="unknown activations"):
        make_nested_gemv(8, 64, 128, 32, 2, 1, host_target(), activations="int4")
    # compile refuses it up front on a target without the kernel (an ARM core without dotprod)
    with pytest.raises(MoecError, match="need the dotprod extension"):
        require_nested_activations(load_target("aarch64-generic"), 8, "int8")
    require_nested_activations(load_target("raspberry-pi-5"), 8, "int8")
    require_nested_activations(load_target("aarch64-generic"), 8, "float32")


def test_arm_int8_nested_gemv_emits_sdot_for_raspberry_pi_5():
    """Built through the factory for the Pi 5 (dotprod): ``sdot`` on NEON, no x86 claim instruction."""
    import tvm
    target = load_target("raspberry-pi-5").tvm()
    func = make_nested_gemv(8, 64, 128, 32, 3, 2, target, activations="int8")
    assert "atomic.bts" not in func.script()
    asm = tvm.compile(tvm.IRModule({"gemv": func}), target=target).mod.inspect_source("asm")
    # 4 widths x 128 K values x 16 rows: 2 sdot per nibble word of 4 rows
    assert len(re.findall(r"^\s+sdot\s+v\d+\.4s", asm, re.M)) >= 4 * 2 * 16


@pytest.mark.parametrize("isa", ["x86", "x86-avx2", "x86-portable"])
@pytest.mark.parametrize("threads", [1, 2])
def test_int8_nested_claimed_tasks_match_the_static_split(monkeypatch, isa, threads):
    """24 tasks (8 tasks of rows x 3 routed rows) are claimed with ``lock bts``, expert-major or tile-major: the
    output equals TVM's static split's bit for bit at mixed run-time widths, an unrouted row left unwritten."""
    import dataclasses

    from moec.runtime.session import use_threads

    target = host_target() if isa == "x86-portable" else _target(isa)
    n = 8 * 16 * x86.PARAMS.int8_nested_task_vectors if isa != "x86-avx2" else 512  # (AVX2: 4 vectors of 8 rows)
    k, gs, experts, top_k = 64, 32, 4, 3
    _, nws, stack = _experts(8, n, k, gs, experts, seed=7, isa=isa)
    x = np.random.default_rng(8).standard_normal((1, k)).astype(np.float32)
    prec, ids = [2, 8, 3, 4], [3, -1, 1]
    outs, scripts = [], []
    for lanes, expert_major in ((0, True), (16, True), (16, False)):
        params = dataclasses.replace(x86.PARAMS, int8_claim_lanes=lanes, int8_expert_major_claims=expert_major)
        monkeypatch.setattr(x86, "PARAMS", params)
        if isa == "x86-portable":
            spec = NestedGemvSpec(8, n, k, gs, experts, top_k, _tile(isa, n))
            func = vnni_nested_gemv(spec, params, portable=True)
        else:
            func = make_nested_gemv(8, n, k, gs, experts, top_k, target, activations="int8")
        scripts.append(func.script())
        mod = compile_kernel(func, target)
        use_threads(threads)
        outs.append(_run(mod, nws, stack, x, prec, ids, n))
    assert "atomic.bts" not in scripts[0] and "atomic.bts" in scripts[1] and scripts[1] != scripts[2]
    assert np.array_equal(outs[1], outs[0]) and np.array_equal(outs[2], outs[0]) and (outs[0][1] == 7.0).all()


@pytest.mark.parametrize("task_vectors, block_vectors", [(4, 0), (8, 0), (8, 4), (16, 4), (16, 8)])
def test_task_vectors_give_the_same_rows(task_vectors, block_vectors):
    """``X86Params.int8_nested_task_vectors``: 4 (one two-chain block a task), 8 (the default) and 16, in one-chain
    blocks of ``int8_nested_block_vectors`` (8, the default: the whole 128-row task; 4: two blocks; 0: twice
    ``int8_nested_tile_vectors``) one after another, at 8 bits too (``int8_nested_eight_one_chain``): every width's
    rows against the reference, a partial last task (N = 1088: 68 vectors) and an unrouted row."""
    import dataclasses

    n, k, gs, experts, top_k = 1088, 64, 32, 4, 3
    params = dataclasses.replace(x86.PARAMS, int8_nested_task_vectors=task_vectors,
                                 int8_nested_block_vectors=block_vectors)
    _, nws, stack = _experts(8, n, k, gs, experts, seed=14, isa="x86-portable")
    spec = NestedGemvSpec(8, n, k, gs, experts, top_k, _tile("x86-portable", n))
    mod = compile_kernel(vnni_nested_gemv(spec, params, portable=True), host_target())
    x = np.random.default_rng(15).standard_normal((1, k)).astype(np.float32)
    ids = [3, -1, 1]
    for prec in ([2, 8, 3, 4], [8, 4, 2, 3]):
        y = _run(mod, nws, stack, x, prec, ids, n)
        assert (y[1] == 7.0).all()
        for r, e in ((0, 3), (2, 1)):
            np.testing.assert_allclose(y[r], _reference(nws[e], prec[e], x[0], gs), rtol=1e-5,
                                       atol=1e-6 * float(np.abs(y[r]).max()))


@pytest.mark.parametrize("eight_one_chain, word_order", [(False, ()), (True, ()), (True, (2, 3, 4, 8)), (False, (2, 4))])
def test_block_chains_and_word_order_give_the_same_bits(eight_one_chain, word_order):
    """``int8_nested_eight_one_chain`` (8 bits in one-chain blocks like the narrower widths, or two-chain blocks of
    ``int8_nested_tile_vectors``) and ``int8_nested_word_order`` (a chunk word by word across the block's vectors,
    or vector by vector) change the order of the integer sums only: bit-identical to the defaults at every width,
    a partial last task (N = 1088) and an unrouted row included."""
    import dataclasses

    n, k, gs, experts, top_k = 1088, 128, 64, 4, 3
    _, nws, stack = _experts(8, n, k, gs, experts, seed=16, isa="x86-portable")
    spec = NestedGemvSpec(8, n, k, gs, experts, top_k, _tile("x86-portable", n))
    x = np.random.default_rng(17).standard_normal((1, k)).astype(np.float32)
    outs = []
    for params in (x86.PARAMS, dataclasses.replace(x86.PARAMS, int8_nested_eight_one_chain=eight_one_chain,
                                                   int8_nested_word_order=word_order)):
        mod = compile_kernel(vnni_nested_gemv(spec, params, portable=True), host_target())
        outs.append([_run(mod, nws, stack, x, prec, [3, -1, 1], n) for prec in ([2, 8, 3, 4], [8, 4, 2, 3])])
    for default, changed in zip(*outs):
        assert np.array_equal(default, changed) and (changed[1] == 7.0).all()
    np.testing.assert_allclose(outs[1][0][0], _reference(nws[3], 4, x[0], gs), rtol=1e-5,
                               atol=1e-6 * float(np.abs(outs[1][0][0]).max()))


@pytest.mark.parametrize("block_vectors", [3, 16])
def test_block_vectors_that_do_not_fit_the_task_are_refused(block_vectors):
    """One-chain blocks must divide the task's vectors and fit the 2 × ``int8_nested_tile_vectors`` accumulators."""
    import dataclasses

    params = dataclasses.replace(x86.PARAMS, int8_nested_task_vectors=16, int8_nested_block_vectors=block_vectors)
    spec = NestedGemvSpec(8, 1024, 64, 32, 4, 3, _tile("x86-portable", 1024))
    with pytest.raises(MoecError, match="block_vectors"):
        vnni_nested_gemv(spec, params, portable=True)


@pytest.mark.parametrize("n", [1024, 192, 80])
def test_whole_tile_tasks_match_the_one_block_tasks(monkeypatch, n):
    """``nested_int8_tile = 128`` (the default): N = 1024 is laid out in 128-row tiles, a task one tile (claimed
    tasks), N = 192 in 64-row tiles and N = 80 in 16-row ones; against ``nested_int8_tile = 0`` (16-row tiles).
    The output equals the 16-row layout's bit for bit at mixed widths, an unrouted row left unwritten."""
    import dataclasses

    from moec.lower.schedules.int8_nested import task_blocks

    k, gs, experts, top_k = 64, 32, 4, 3
    x = np.random.default_rng(9).standard_normal((1, k)).astype(np.float32)
    prec, ids = [2, 8, 3, 4], [3, -1, 1]
    outs = []
    for limit in (0, 128):
        params = dataclasses.replace(x86.PARAMS, nested_int8_tile=limit)
        monkeypatch.setattr(x86, "PARAMS", params)
        tile = params.tile_for(n, None, "int8")  # the AVX-512 parameters whatever the host (a portable kernel)
        assert tile == (16 if limit == 0 else {1024: 128, 192: 64, 80: 16}[n])
        assert params.tile_for(n, None, "float32") == 16
        assert task_blocks(tile, 16, params.int8_nested_tile_vectors) == (2 if tile == 128 else 1)
        rng = np.random.default_rng(10)
        nws = [nest(pack_weight((rng.standard_normal((n, k)) * 0.1).astype(np.float32), 8, gs))
               for _ in range(experts)]
        stack = stack_kernel_layouts([nested_kernel_layout(nw, tile) for nw in nws])
        spec = NestedGemvSpec(8, n, k, gs, experts, top_k, tile)
        mod = compile_kernel(vnni_nested_gemv(spec, params, portable=True), host_target())
        outs.append(_run(mod, nws, stack, x, prec, ids, n))
    assert np.array_equal(outs[0], outs[1]) and (outs[1][1] == 7.0).all()
    for r, e in ((0, 3), (2, 1)):
        np.testing.assert_allclose(outs[1][r], _reference(nws[e], prec[e], x[0], gs), rtol=1e-5,
                                   atol=1e-6 * float(np.abs(outs[1][r]).max()))


def test_nested_grouped_gemm_reads_the_int8_layout_tile(monkeypatch):
    """The prefill's nested grouped GEMM (float32 activations) reads the tile the int8 nested GEMV's layout
    has (``layout_activations="int8"``): 128-row tiles with ``nested_int8_tile = 128`` on AVX-512, 32 on AVX2
    (a task of the AVX2 nested GEMV), numerics against the derived weights."""
    import dataclasses

    from moec.lower.kernels.factory import make_nested_grouped_gemm

    monkeypatch.setattr(x86, "PARAMS", dataclasses.replace(x86.PARAMS, nested_int8_tile=128))
    n, k, gs, experts = 256, 64, 32, 3
    _, nws, stack = _experts(8, n, k, gs, experts, seed=12)
    assert stack["seg0"].shape[-1] == kernel_tile(host_target(), n, None, "int8") in (128, 32)
    mod = compile_kernel(make_nested_grouped_gemm(8, n, k, gs, experts, host_target(), layout_activations="int8"),
                         host_target())
    counts, prec = [2, 0, 5], [3, 8, 2]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    x = np.random.default_rng(13).standard_normal((int(offsets[-1]), k)).astype(np.float32)
    segs = [stack[f"seg{s}"] for s in range(4)]
    y = call(mod, "grouped_gemm", [x, *segs, stack["scale"], stack["zero"], np.asarray(prec, np.int32), offsets,
                                   np.zeros((len(x), n), np.float32)])
    ref = np.concatenate([x[offsets[e]:offsets[e + 1]] @ dequantize_nested(nws[e], prec[e]).T for e in range(experts)])
    assert_close(y, ref)
