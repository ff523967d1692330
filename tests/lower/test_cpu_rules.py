"""moec's CPU GEMV rule: the reference GEMVs (MLA's per-head projections) build in bounded time, exactly.

dlight's CPU GEMV rule vectorized the output rows of these (up to 128 lanes, each a gather) and
unrolled 64 reduction steps below: at DeepSeek-V2-Lite's ``k_up`` (16 heads x 512 x 128) LLVM sat
in code generation for more than ten minutes. The rule that replaced it vectorizes the contiguous
reduction axis, never wider than one SIMD register.
"""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from moec.core.targets import load_target  # noqa: E402
from moec.lower import te_ops  # noqa: E402
from moec.lower.pipeline import CPU_PHASES, make_pipeline  # noqa: E402
from moec.lower.schedules.cpu_rules import reduction_lanes, vector_lanes  # noqa: E402

pytestmark = pytest.mark.tvm


def _head_linear_module(heads: int, out: int, k: int) -> tvm.IRModule:
    """``2 * head_linear(x[:, :k], w)``: the decode form, with the producer and epilogue that fuse into it."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((heads, k + 3), "float32"))
    w = relax.Var("w", relax.TensorType((heads, out, k), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            xs = bb.emit(relax.op.strided_slice(x, axes=[1], begin=[0], end=[k]))
            y = bb.emit_te(te_ops.head_linear, xs, w)
            y = bb.emit_output(bb.emit(relax.op.multiply(y, relax.const(np.float32(2)))))
        bb.emit_func_output(y)
    return bb.get()


def test_reduction_lanes():
    assert reduction_lanes(128, 16) == 16
    assert reduction_lanes(36, 16) == 4
    assert reduction_lanes(512, 4) == 4
    assert reduction_lanes(7, 16) == 1


# (16, 512, 128), (16, 128, 512): DeepSeek-V2-Lite's k_up and v_up; (3, 20, 36): odd rows, 4-lane reduction
@pytest.mark.parametrize("shape", [(16, 512, 128), (16, 128, 512), (3, 20, 36)], ids=["k_up", "v_up", "odd"])
def test_head_linear_builds_fast_with_register_wide_vectors(tmp_path, shape):
    heads, out, k = shape
    target = load_target("host").tvm()
    t0 = time.time()
    with target:
        ex = tvm.compile(_head_linear_module(*shape), target=target,
                         relax_pipeline=make_pipeline(CPU_PHASES, tmp_path / "ir"))
    seconds = time.time() - t0
    assert seconds < 60, f"{shape}: {seconds:.0f} s to build"  # was > 600 s at (16, 512, 128)

    scheduled = (tmp_path / "ir" / "03-schedule.py").read_text()
    fused = scheduled[scheduled.index("def fused_strided_slice_head_linear"):]
    fused = fused[:fused.index("@T.prim_func") if "@T.prim_func" in fused else None]
    widths = [int(n) for n in re.findall(r"T\.vectorized\((?:T\.int64\()?(\d+)", fused)]
    assert widths and max(widths) <= vector_lanes(target), widths
    assert "_rf" in fused and "T.parallel(" in fused  # partial sums along the reduction, rows in parallel

    rng = np.random.default_rng(0)
    x = rng.standard_normal((heads, k + 3)).astype(np.float32)
    w = rng.standard_normal((heads, out, k)).astype(np.float32)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w)).numpy()
    np.testing.assert_allclose(got, 2 * np.einsum("hk,hok->ho", x[:, :k], w), rtol=1e-5, atol=1e-4)


def _rows_module(rows) -> tvm.IRModule:
    """``(x + y) * 2`` over ``rows`` x 48 float32 rows (a symbolic ``rows``: a prefill's shape)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((rows, 48), "float32"))
    y = relax.Var("y", relax.TensorType((rows, 48), "float32"))
    with bb.function("main", [x, y]):
        with bb.dataflow():
            s = bb.emit(relax.op.add(x, y))
            out = bb.emit_output(bb.emit(relax.op.multiply(s, relax.const(np.float32(2)))))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("symbolic", [True, False], ids=["prompt-rows", "static"])
def test_prompt_rows_elementwise_runs_on_the_pool(tmp_path, symbolic):
    """A prompt's element-wise function (symbolic rows) is a parallel loop, exact; a static one (a decode
    step's) is left as it was, serial."""
    rows = tvm.tirx.Var("n", "int64") if symbolic else 5
    target = load_target("host").tvm()
    with target:
        ex = tvm.compile(_rows_module(rows), target=target, relax_pipeline=make_pipeline(CPU_PHASES, tmp_path / "ir"))
    scheduled = (tmp_path / "ir" / "03-schedule.py").read_text()
    fused = scheduled[scheduled.index("def fused_add_multiply"):]
    assert ("T.parallel(" in fused) == symbolic
    rng = np.random.default_rng(1)
    x, y = (rng.standard_normal((5000 if symbolic else 5, 48)).astype(np.float32) for _ in range(2))
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(y)).numpy()
    np.testing.assert_array_equal(got, (x + y) * np.float32(2))
