"""Row-wise prefill kernels (softmax, SiLU with the polynomial exp) against numpy, and as aarch64 code."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm

from moec.core.targets import load_target
from moec.lower.kernels.factory import compile_kernel, host_target
from moec.lower.kernels.rowwise import float_rows_kernel, rms_norm_kernel, silu_kernel, softmax_kernel

from kernel_helpers import call

pytestmark = pytest.mark.tvm


@pytest.mark.parametrize("cols", [37, 48])
def test_softmax_kernel_matches_numpy(cols):
    """A vector tail (37) or none (48); masked -1e30 entries give exactly 0; large logits do not overflow."""
    rng = np.random.default_rng(cols)
    x = (rng.standard_normal((3, 5, cols)) * 20).astype(np.float32)
    x[:, :, cols // 2:] = np.float32(-1e30)
    x[0, 0, 0] = 300.0
    out = call(compile_kernel(softmax_kernel(3), host_target()), "row_softmax", [x, np.zeros_like(x)])
    e = np.exp(x.astype(np.float64) - x.max(-1, keepdims=True))
    np.testing.assert_allclose(out, e / e.sum(-1, keepdims=True), rtol=2e-6, atol=1e-7)
    assert (out[:, :, cols // 2:] == 0).all()


@pytest.mark.parametrize("rows,cols", [(5, 21), (7, 48), (1, 16)])
def test_causal_softmax_is_the_plain_kernel_bit_for_bit(rows, cols):
    """Causal scores (-1e30 past row t's position cols - rows + t): the causal kernel skips those columns and
    returns exactly the plain kernel's values, including the zeros."""
    rng = np.random.default_rng(rows * cols)
    x = (rng.standard_normal((2, rows, cols)) * 5).astype(np.float32)
    future = np.arange(cols)[None, :] > (cols - rows + np.arange(rows))[:, None]
    x[:, future] = np.float32(-1e30)
    plain = call(compile_kernel(softmax_kernel(2), host_target()), "row_softmax", [x, np.zeros_like(x)])
    causal = call(compile_kernel(softmax_kernel(2, causal=True), host_target()), "row_softmax",
                  [x, np.full_like(x, 7.0)])
    np.testing.assert_array_equal(causal, plain)


@pytest.mark.parametrize("rows,n,block", [(13, 8, 8), (3, 64, 2), (1, 24, 4)])
def test_float_rows_kernel_matches_numpy(rows, n, block):
    """The prefill's small float projection (a router): x [R, K] @ wt [K, N], a tail block of rows, 8/16-lane N."""
    rng = np.random.default_rng(rows + n)
    x = rng.standard_normal((rows, 96)).astype(np.float32)
    wt = rng.standard_normal((96, n)).astype(np.float32)
    out = call(compile_kernel(float_rows_kernel(n, block), host_target()), "float_rows",
               [x, wt, np.zeros((rows, n), np.float32)])
    np.testing.assert_allclose(out, x.astype(np.float64) @ wt, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows,width", [(19, 48), (1, 24), (8, 256)])
def test_rms_norm_kernel_is_the_te_op_bit_for_bit(rows, width):
    """The prefill's RMSNorm kernel against the decode graph's TE op (``te_ops.rms_norm``, compiled as the graph
    compiles it: unscheduled): equal bits, a tail block of rows, 8- and 16-lane widths; and close to numpy."""
    from tvm import te

    from moec.lower import te_ops
    rng = np.random.default_rng(rows + width)
    x = (rng.standard_normal((rows, width)) * 3).astype(np.float32)
    w = rng.standard_normal(width).astype(np.float32)
    xp, wp = te.placeholder((rows, width), "float32", "x"), te.placeholder((width,), "float32", "w")
    func = te.create_prim_func([xp, wp, te_ops.rms_norm(xp, wp, 1e-5)]).with_attr(
        {"global_symbol": "ref", "tirx.is_scheduled": True})
    ref = call(tvm.compile(tvm.IRModule({"ref": func}), target=host_target()), "ref", [x, w, np.zeros_like(x)])
    out = call(compile_kernel(rms_norm_kernel(width, 1e-5), host_target()), "row_rms_norm", [x, w, np.zeros_like(x)])
    np.testing.assert_array_equal(out, ref)
    want = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_silu_kernel_matches_numpy():
    x = np.concatenate([np.linspace(-100, 100, 64, dtype=np.float32).reshape(2, 32),
                        np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32) * 4])
    out = call(compile_kernel(silu_kernel(32), host_target()), "row_silu", [x, np.zeros_like(x)])
    ref = x.astype(np.float64) / (1 + np.exp(-x.astype(np.float64)))
    np.testing.assert_allclose(out, ref, rtol=2e-6, atol=1e-30)


def test_rowwise_kernels_compile_to_neon():
    target = load_target("aarch64-generic").tvm()
    for func in (softmax_kernel(2), softmax_kernel(2, causal=True), silu_kernel(64), float_rows_kernel(8, 8),
                 rms_norm_kernel(64, 1e-5)):
        name = func.attrs["global_symbol"]
        asm = tvm.compile(tvm.IRModule({name: func}), target=target).mod.inspect_source("asm")
        assert re.search(r"^\s+fmla\s+v\d+\.4s", asm, re.M), f"{name}: no 4-lane NEON fused multiply-add"


def test_rowwise_kernels_are_not_taken_for_reshapes():
    """One input, one output of the same size: Relax asks whether such a kernel is a reshape, which
    needs a block body (without one the Relax build stopped with an internal error)."""
    from tvm.relax.analysis import has_reshape_pattern
    assert not has_reshape_pattern(softmax_kernel(2)) and not has_reshape_pattern(silu_kernel(64))
    assert not has_reshape_pattern(softmax_kernel(2, causal=True))


def test_row_topk_is_a_stable_descending_sort():
    """The router's top-k kernel: the k largest, descending, ties to the lower index (numpy's stable argsort of
    the negated row, which is Relax's topk order), -inf rows (dropped experts) included."""
    from moec.lower.kernels.row_topk import row_topk_kernel

    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 8)).astype(np.float32)
    x[1, [2, 5, 6]] = 3.0           # a three-way tie for the top
    x[2] = -np.inf                  # every expert masked
    x[3, :4] = x[3, 4:]             # pairs of equal values
    mod = compile_kernel(row_topk_kernel(8, 3), host_target())
    args = [tvm.runtime.tensor(a, tvm.cpu()) for a in (x, np.zeros((6, 3), np.float32), np.zeros((6, 3), np.int32))]
    mod["row_topk"](*args)
    want = np.argsort(-x, axis=1, kind="stable")[:, :3]
    assert (args[2].numpy() == want).all()
    assert (args[1].numpy() == np.take_along_axis(x, want, axis=1)).all()


def test_rope_table_gives_the_same_bits_as_rope():
    """RoPE from the shared cos/sin table (decode rows and prefill rows) equals the per-element RoPE exactly."""
    from tvm import te, tirx

    from moec.lower import te_ops

    half, pos = 8, 37
    inv = te.placeholder((half,), "float32", "inv_freq")
    freqs = (10000.0 ** (-np.arange(half) / half)).astype(np.float32)
    x2, x3 = te.placeholder((3, 2 * half), "float32", "x"), te.placeholder((4, 3, 2 * half), "float32", "x")
    p = tirx.Var("p", "int64")
    funcs = {"rope": te.create_prim_func([x2, inv, te_ops.rope(x2, p, inv), p]),
             "rope_rows": te.create_prim_func([x3, inv, te_ops.rope_rows(x3, p, inv), p])}
    for name, x, rows in (("table1", x2, 1), ("table4", x3, 4)):
        table = te.placeholder((2, rows, half), "float32", "table")
        funcs[name] = te.create_prim_func([inv, te_ops.rope_table(p, rows, inv), p])
        funcs[f"apply_{name}"] = te.create_prim_func([x, table, te_ops.rope_apply(x, table)])
    mods = {n: tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=host_target())
            for n, f in funcs.items()}
    rng = np.random.default_rng(2)
    for shape, ref, table_name, rows in (((3, 2 * half), "rope", "table1", 1), ((4, 3, 2 * half), "rope_rows", "table4", 4)):
        xv = tvm.runtime.tensor(rng.standard_normal(shape).astype(np.float32))
        fv = tvm.runtime.tensor(freqs)
        want = tvm.runtime.empty(shape, "float32")
        mods[ref]["main"](xv, fv, want, pos)
        table = tvm.runtime.empty((2, rows, half), "float32")
        mods[table_name]["main"](fv, table, pos)
        got = tvm.runtime.empty(shape, "float32")
        mods[f"apply_{table_name}"]["main"](xv, table, got)
        assert (got.numpy() == want.numpy()).all()
