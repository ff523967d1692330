"""Nested-storage GEMV: each expert's width is a run-time argument; numerics against the derived
weights (numpy), the x86 and ARM schedules, and the planes a width skips are never loaded."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm

from moec.core.errors import MoecError
from moec.core.targets import load_target
from moec.lower.kernels.factory import compile_kernel, host_target, make_nested_gemv
from moec.lower.kernels.layout import nested_kernel_layout, stack_kernel_layouts
from moec.lower.kernels.nested_gemv import NestedGemvSpec, guard_segments, nested_gemv_definition
from moec.lower.schedules import arm, kernel_tile
from moec.quant.nested import dequantize_nested, nest
from moec.quant.packed_model import pack_weight

from kernel_helpers import assert_close, call

pytestmark = pytest.mark.tvm


def _experts(storage, n, k, gs, experts, tile, seed=0):
    rng = np.random.default_rng(seed)
    nws = [nest(pack_weight((rng.standard_normal((n, k)) * 0.1).astype(np.float32), storage, gs))
           for _ in range(experts)]
    return nws, stack_kernel_layouts([nested_kernel_layout(nw, tile) for nw in nws])


def _run(mod, nws, stack, x, prec, ids, n):
    segs = [stack[f"seg{s}"] for s in range(len(nws[0].segments))]
    y = np.full((len(ids), n), 7.0, np.float32)
    out = call(mod, "gemv", [x, *segs, stack["scale"], stack["zero"], np.asarray(prec, np.int32),
                             np.asarray(ids, np.int32), y])
    return out


@pytest.mark.parametrize("storage,per_expert", [(8, False), (4, True)])
def test_nested_gemv_serves_each_experts_width_at_run_time(storage, per_expert):
    n, k, gs, experts, top_k = 64, 128, 32, 4, 3
    nws, stack = _experts(storage, n, k, gs, experts, kernel_tile(host_target(), n, None, "float32"))
    mod = compile_kernel(make_nested_gemv(storage, n, k, gs, experts, top_k, host_target(),
                                          x_per_expert=per_expert), host_target())
    x = np.random.default_rng(1).standard_normal((top_k if per_expert else 1, k)).astype(np.float32)
    widths = nws[0].format.derived_bits
    plans = [[widths[e % len(widths)] for e in range(experts)], [widths[0]] * experts,
             [widths[-1 - (e % 2)] for e in range(experts)]]
    for prec in plans:  # one compiled kernel, three plans: the width is only an argument
        ids = [3, -1, 1]
        y = _run(mod, nws, stack, x, prec, ids, n)
        for r, e in enumerate(ids):
            if e < 0:
                assert (y[r] == 7.0).all()  # row guard: nothing computed or read
                continue
            ref = dequantize_nested(nws[e], prec[e]) @ x[r if per_expert else 0]
            assert_close(y[r], ref)


def test_unneeded_planes_are_skipped_not_masked():
    """A width that does not need a plane never loads it: garbage planes leave the output unchanged."""
    n, k, gs, experts = 32, 64, 32, 2
    nws, stack = _experts(8, n, k, gs, experts, kernel_tile(host_target(), n, None, "float32"))
    mod = compile_kernel(make_nested_gemv(8, n, k, gs, experts, 1, host_target()), host_target())
    x = np.ones((1, k), np.float32)
    clean = _run(mod, nws, stack, x, [2, 3], [0], n)
    dirty = dict(stack)
    for s in (1, 2, 3):  # NaN-producing bits are not possible in codes, so use all-ones planes
        dirty[f"seg{s}"] = np.full_like(stack[f"seg{s}"], 0xFFFFFFFF)
    assert np.array_equal(_run(mod, nws, dirty, x, [2, 3], [0], n), clean)
    assert not np.array_equal(_run(mod, nws, dirty, x, [3, 3], [0], n), _run(mod, nws, stack, x, [3, 3], [0], n))


def test_each_width_is_one_guarded_loop_nest():
    """Per task, one width test per derived width outside every loop, around that width's whole nest
    (its output init, group loop and updates): no other width's accumulator is touched per group."""
    text = make_nested_gemv(8, 64, 128, 32, 2, 2, host_target()).script()
    lines = text.splitlines()
    tests = [i for i, line in enumerate(lines) if re.search(r"if prec\[expert_ids\[.*\]\] == \d+:", line)]
    assert [int(lines[i].rsplit("==", 1)[1].strip(" :")) for i in tests] == [2, 3, 4, 8]
    ends = tests[1:] + [len(lines)]
    for d, (start, end) in enumerate(zip(tests, ends)):
        inside = "\n".join(lines[start:end])
        for block in (f"y{d}_init", f"qdot{d}_init", f"qdot{d}_update", f"y{d}_update"):
            assert f'T.sblock("{block}")' in inside, (d, block)
        assert not re.search(rf'T.sblock\("(y|qdot)(?!{d}_)\d', inside), d


def test_arm_nested_schedule_on_host_and_neon_codegen():
    n, k, gs, experts, top_k = 64, 128, 32, 3, 2
    spec = NestedGemvSpec(8, n, k, gs, experts, top_k, arm.PARAMS.tile_for(n, None, "float32"))
    func = guard_segments(arm.schedule_nested_gemv(nested_gemv_definition(spec), spec), spec)
    nws, stack = _experts(8, n, k, gs, experts, arm.PARAMS.tile_for(n, None, "float32"), seed=2)
    x = np.random.default_rng(3).standard_normal((1, k)).astype(np.float32)
    y = _run(compile_kernel(func, host_target()), nws, stack, x, [8, 3, 2], [2, 0], n)
    for r, e in enumerate([2, 0]):
        assert_close(y[r], dequantize_nested(nws[e], [8, 3, 2][e]) @ x[0])
    target = load_target("raspberry-pi-5").tvm()
    asm = tvm.compile(tvm.IRModule({"gemv": make_nested_gemv(8, n, k, gs, experts, top_k, target)}),
                      target=target).mod.inspect_source("asm")
    assert re.search(r"^\s+fmla\s+v\d+\.4s", asm, re.M), "no 4-lane NEON fused multiply-add"


def test_nested_kernel_shape_errors():
    with pytest.raises(MoecError, match="multiple of 32"):
        make_nested_gemv(8, 64, 128, 16, 2, 1, host_target())
    with pytest.raises(MoecError, match="no nested storage at 3 bits"):
        make_nested_gemv(3, 64, 128, 32, 2, 1, host_target())
