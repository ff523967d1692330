"""The CUDA prefill causal attention (``schedules/cuda_attention.py``): its serial form compiled for the CPU and its
bound form's CUDA C under the host emulation (both thread orders), against numpy's masked softmax attention:
chunks shorter and longer than a tile, after cached positions, grouped KV heads, query and value widths that
differ (latent attention)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import tvm

from moec.core.errors import MoecError
from moec.lower.schedules.cuda_attention import cuda_causal_attention

from cuda_host import HostKernel

pytestmark = pytest.mark.tvm


def _reference(q, keys, values, pos: int) -> np.ndarray:
    rows, heads, _ = q.shape
    rep = heads // keys.shape[0]
    k, v = np.repeat(keys, rep, axis=0), np.repeat(values, rep, axis=0)   # [H, S, d]
    s = np.einsum("thd,hsd->hts", q, k)
    s[:, np.arange(rows)[:, None] + pos < np.arange(k.shape[1])[None, :]] = -np.inf
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("hts,hsd->thd", p, v)


def _inputs(rows, pos, heads, kv_heads, hd, vd, seed=0):
    rng = np.random.default_rng(seed)
    q = (rng.standard_normal((rows, heads, hd)) / np.sqrt(hd)).astype(np.float32)
    keys = rng.standard_normal((kv_heads, pos + rows, hd)).astype(np.float32)
    values = rng.standard_normal((kv_heads, pos + rows, vd)).astype(np.float32)
    return q, keys, values


CASES = [(5, 0, 4, 2, 64, 64), (37, 6, 4, 2, 64, 64), (16, 16, 2, 2, 32, 32), (20, 3, 4, 1, 96, 64)]


@pytest.mark.parametrize("rows, pos, heads, kv_heads, hd, vd", CASES)
def test_serial_form_matches_numpy(rows, pos, heads, kv_heads, hd, vd):
    q, keys, values = _inputs(rows, pos, heads, kv_heads, hd, vd)
    func = cuda_causal_attention(heads, kv_heads, hd, vd, bind=False)
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target="llvm")
    out = tvm.runtime.tensor(np.full((rows, heads, vd), np.nan, np.float32))
    lib["main"](tvm.runtime.tensor(q), tvm.runtime.tensor(keys), tvm.runtime.tensor(values), out)
    np.testing.assert_allclose(out.numpy(), _reference(q, keys, values, pos), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
@pytest.mark.parametrize("rows, pos, heads, kv_heads, hd, vd", CASES[1:])
def test_bound_form_runs_as_cuda_c(rows, pos, heads, kv_heads, hd, vd):
    q, keys, values = _inputs(rows, pos, heads, kv_heads, hd, vd)
    func = cuda_causal_attention(heads, kv_heads, hd, vd)
    kern = HostKernel.of(func, "sm_90", {"rows": rows, "keys_len": pos + rows})
    out = np.full((rows, heads, vd), np.nan, np.float32)
    got = [kern(reverse=r, q=q, keys=keys, values=values, out=out, rows=rows, keys_len=pos + rows)["out"]
           for r in (False, True)]
    np.testing.assert_array_equal(got[0], got[1])  # no race between the block's threads
    np.testing.assert_allclose(got[0], _reference(q, keys, values, pos), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(4, 3, 64, 64), (4, 2, 64, 60), (4, 2, 256, 256)])
def test_shapes_it_does_not_take_are_one_line_errors(shape):
    with pytest.raises(MoecError) as err:
        cuda_causal_attention(*shape)
    assert "\n" not in str(err.value)
