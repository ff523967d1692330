"""Row-wise prefill kernels (softmax, SiLU with the polynomial exp) against numpy, and as aarch64 code."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm

from moec.core.targets import load_target
from moec.lower.kernels.factory import compile_kernel, host_target
from moec.lower.kernels.rowwise import silu_kernel, softmax_kernel

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


def test_silu_kernel_matches_numpy():
    x = np.concatenate([np.linspace(-100, 100, 64, dtype=np.float32).reshape(2, 32),
                        np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32) * 4])
    out = call(compile_kernel(silu_kernel(32), host_target()), "row_silu", [x, np.zeros_like(x)])
    ref = x.astype(np.float64) / (1 + np.exp(-x.astype(np.float64)))
    np.testing.assert_allclose(out, ref, rtol=2e-6, atol=1e-30)


def test_rowwise_kernels_compile_to_neon():
    target = load_target("aarch64-generic").tvm()
    for func in (softmax_kernel(2), silu_kernel(64)):
        name = func.attrs["global_symbol"]
        asm = tvm.compile(tvm.IRModule({name: func}), target=target).mod.inspect_source("asm")
        assert re.search(r"^\s+fmla\s+v\d+\.4s", asm, re.M), f"{name}: no 4-lane NEON fused multiply-add"


def test_rowwise_kernels_are_not_taken_for_reshapes():
    """One input, one output of the same size: Relax asks whether such a kernel is a reshape, which
    needs a block body (without one the Relax build stopped with an internal error)."""
    from tvm.relax.analysis import has_reshape_pattern
    assert not has_reshape_pattern(softmax_kernel(2)) and not has_reshape_pattern(silu_kernel(64))
