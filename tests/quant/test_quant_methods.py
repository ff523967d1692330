"""Error-minimising methods ("mse", "hqq") never lose to round-to-nearest, group by group."""

from __future__ import annotations

import numpy as np
import pytest

from moec.quant import SUPPORTED_BITS, dequantize, quantize

GROUP = 64


def group_err(w: np.ndarray, method: str, bits: int, importance=None) -> np.ndarray:
    """Per-group (weighted) squared error in float64, ``[N, G]``."""
    deq = dequantize(quantize(w, bits, GROUP, method=method, importance=importance))
    d2 = np.square(w.astype(np.float64) - deq)
    if importance is not None:
        d2 *= importance
    return d2.reshape(w.shape[0], -1, GROUP).sum(-1)


def not_worse(err: np.ndarray, ref: np.ndarray) -> bool:
    # Candidates are compared in float32 inside the method; allow float32-level ties here.
    return bool((err <= ref * (1 + 1e-5) + 1e-12).all())


@pytest.fixture(scope="module")
def weight():
    return np.random.default_rng(1).standard_normal((64, 512)).astype(np.float32)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_mse_never_worse_than_rtn(weight, bits):
    rtn = group_err(weight, "rtn", bits)
    mse = group_err(weight, "mse", bits)
    assert not_worse(mse, rtn)


@pytest.mark.parametrize("bits", [2, 3])
def test_mse_strictly_better_at_low_bits(weight, bits):
    assert group_err(weight, "mse", bits).sum() < 0.95 * group_err(weight, "rtn", bits).sum()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_hqq_never_worse_than_mse(weight, bits):
    mse = group_err(weight, "mse", bits)
    hqq = group_err(weight, "hqq", bits)
    assert not_worse(hqq, mse)
    assert hqq.sum() <= mse.sum()


@pytest.fixture(scope="module")
def importance(weight):
    imp = np.random.default_rng(2).exponential(size=weight.shape[1]).astype(np.float32)
    imp[:GROUP] = 0.0  # a group nobody looks at must not break anything
    return imp


@pytest.mark.parametrize("method", ["mse", "hqq"])
def test_importance_weighted_never_worse_than_rtn(weight, importance, method):
    rtn = group_err(weight, "rtn", 3, importance)
    weighted = group_err(weight, method, 3, importance)
    assert not_worse(weighted, rtn)
    assert weighted.sum() < rtn.sum()


def test_mse_importance_minimises_weighted_error(weight, importance):
    # Same candidate set, so choosing by the weighted error can only help under that error.
    weighted = group_err(weight, "mse", 3, importance)
    plain_deq = dequantize(quantize(weight, 3, GROUP, method="mse"))
    plain = (np.square(weight.astype(np.float64) - plain_deq) * importance)
    assert not_worse(weighted, plain.reshape(weight.shape[0], -1, GROUP).sum(-1))


def test_methods_deterministic(weight):
    a = quantize(weight, 3, GROUP, method="mse")
    b = quantize(weight, 3, GROUP, method="mse")
    np.testing.assert_array_equal(a.q, b.q)
    np.testing.assert_array_equal(a.scale, b.scale)
    np.testing.assert_array_equal(a.zero, b.zero)
