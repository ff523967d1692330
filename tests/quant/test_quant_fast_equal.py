"""The blocked, fused, threaded quantizer searches and GPTQ's new Hessian factor equal the original code."""

from __future__ import annotations

import numpy as np
import pytest

from moec.quant import blocks, gptq
from moec.quant.affine import affine_quantize, group_view
from moec.quant.quantize import quantize
from tests.quant import reference_quantizers as ref

REFS = {"mse": ref.mse_params, "hqq": ref.hqq_params}


@pytest.fixture(scope="module")
def weight():
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((96, 256)) * 0.02).astype(np.float32)
    w[3, :64] = 0.0                     # an all-zero group
    w[5, 64:128] *= 40.0                # an outlier group
    return w


@pytest.mark.parametrize("threads", ["1", "2"])
@pytest.mark.parametrize("method", ["mse", "hqq"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_search_equals_original(weight, method, bits, threads, monkeypatch):
    monkeypatch.setenv("MOEC_QUANT_THREADS", threads)
    monkeypatch.setattr(blocks, "BLOCK_ELEMS", 7 * 256)  # 7-row blocks: many, the last one partial
    imp = np.random.default_rng(bits).exponential(size=256).astype(np.float32)
    for importance in (None, imp):
        qt = quantize(weight, bits, 64, method, importance=importance)
        wg = group_view(weight, 64)
        scale, zero = REFS[method](wg, bits, None if importance is None else importance.reshape(1, 4, 64))
        assert np.array_equal(qt.scale, scale) and np.array_equal(qt.zero, zero)
        assert np.array_equal(qt.q, affine_quantize(wg, scale, zero, bits).reshape(weight.shape))


def test_bad_thread_count_is_one_line(weight, monkeypatch):
    monkeypatch.setenv("MOEC_QUANT_THREADS", "zero")
    with pytest.raises(Exception, match="MOEC_QUANT_THREADS must be a positive integer"):
        quantize(weight, 4, 64, "mse")


def test_gptq_factor_and_codes_equal_original(monkeypatch):
    rng = np.random.default_rng(3)
    k = 256
    x = rng.standard_normal((512, k)) * rng.exponential(size=k)
    x[:, 7] = 0.0  # a dead input channel
    h = x.T @ x / len(x)
    u = gptq.hessian_inverse_factor(h)
    u0 = ref.hessian_inverse_factor(h)
    assert np.allclose(u, u0, rtol=1e-9, atol=1e-12 * np.abs(u0).max())
    assert np.array_equal(u, np.triu(u))
    w = (rng.standard_normal((48, k)) * 0.02).astype(np.float32)
    new = gptq.gptq_quantize(w, 3, 64, h)
    again = gptq.gptq_quantize(w, 3, 64, h)  # the same Hessian object: its factor is reused
    monkeypatch.setattr(gptq, "hessian_inverse_factor", ref.hessian_inverse_factor)
    monkeypatch.setattr(gptq, "_last_factor", None)
    old = gptq.gptq_quantize(w, 3, 64, h)
    assert gptq._last_factor[2] is not u and np.array_equal(again.q, new.q)
    assert np.array_equal(new.q, old.q) and np.array_equal(new.scale, old.scale)
    assert np.array_equal(new.zero, old.zero)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_threaded_search_works_in_a_forked_child(weight, monkeypatch):
    import multiprocessing

    monkeypatch.setenv("MOEC_QUANT_THREADS", "2")
    monkeypatch.setattr(blocks, "BLOCK_ELEMS", 7 * 256)
    parent = quantize(weight, 4, 64, "mse")  # the pool now exists in this process
    with multiprocessing.get_context("fork").Pool(1) as pool:
        child = pool.apply_async(quantize, (weight, 4, 64, "mse")).get(timeout=60)
    assert np.array_equal(child.q, parent.q) and np.array_equal(child.scale, parent.scale)
