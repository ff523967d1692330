"""quantize/dequantize against a naive per-group numpy reference, error bounds and input errors."""

from __future__ import annotations

import numpy as np
import pytest

from moec.core.errors import MoecError
from moec.quant import SUPPORTED_BITS, QuantizedTensor, dequantize, quantize


def _ceil_fp16(x: np.float32) -> np.float16:
    s = np.float16(x)
    if np.float32(s) < x:
        s = np.nextafter(s, np.float16(np.inf))
    return s


def naive_quantize(w: np.ndarray, bits: int, group: int):
    """One group at a time, written from the spec with no shared code."""
    maxq = 2**bits - 1
    n, k = w.shape
    q = np.zeros((n, k), np.uint8)
    scale = np.zeros((n, k // group), np.float16)
    zero = np.zeros((n, k // group), np.uint8)
    for r in range(n):
        for g in range(k // group):
            x = w[r, g * group:(g + 1) * group].astype(np.float32)
            lo = min(np.float32(x.min()), np.float32(0))
            hi = max(np.float32(x.max()), np.float32(0))
            s32 = np.float32(np.float32(hi - lo) / np.float32(maxq))
            s = _ceil_fp16(s32) if s32 > 0 else np.float16(1.0)
            sf = np.float32(s)
            z = min(max(round(float(np.float32(-lo / sf))), 0), maxq)
            for i in range(group):
                v = round(float(np.float32(x[i] / sf))) + z
                q[r, g * group + i] = min(max(v, 0), maxq)
            scale[r, g] = s
            zero[r, g] = z
    return q, scale, zero


def naive_dequantize(q, scale, zero, group):
    out = np.zeros(q.shape, np.float64)
    for r in range(q.shape[0]):
        for c in range(q.shape[1]):
            out[r, c] = (int(q[r, c]) - int(zero[r, c // group])) * float(scale[r, c // group])
    return out


@pytest.fixture(scope="module")
def weight():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 256)).astype(np.float32) * 0.05
    w[0, :32] = 0.0                 # all-zero group
    w[1, :32] = 0.0125              # constant positive group
    w[1, 32:64] = -3e-3             # constant negative group
    w[2, 64:128] += 0.2             # group that does not straddle 0
    w[2, 200] = 0.9                 # outlier
    return w


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("group", [32, 64, 128])
def test_matches_naive_reference(weight, bits, group):
    qt = quantize(weight, bits, group)
    q, scale, zero = naive_quantize(weight, bits, group)
    assert qt.q.dtype == np.uint8 and qt.scale.dtype == np.float16 and qt.zero.dtype == np.uint8
    np.testing.assert_array_equal(qt.scale, scale)
    np.testing.assert_array_equal(qt.zero, zero)
    np.testing.assert_array_equal(qt.q, q)
    deq = dequantize(qt)
    assert deq.dtype == np.float32 and deq.shape == weight.shape
    # (q - zero) * fp16 scale is exact in float32, so the float64 reference agrees exactly.
    np.testing.assert_array_equal(deq.astype(np.float64), naive_dequantize(q, scale, zero, group))


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_rtn_error_within_half_step(weight, bits):
    group = 32
    qt = quantize(weight, bits, group)
    assert np.isfinite(qt.scale.astype(np.float32)).all() and (qt.scale > 0).all()
    assert int(qt.q.max()) <= 2**bits - 1 and int(qt.zero.max()) <= 2**bits - 1
    step = np.repeat(qt.scale.astype(np.float64), group, axis=1)
    err = np.abs(weight.astype(np.float64) - dequantize(qt))
    # The scale is rounded up to fp16, so no element of a group's own range is clipped.
    assert (err <= step * (0.5 + 1e-4)).all()
    assert (dequantize(qt)[weight == 0] == 0).all()


def test_scale_guards():
    w = np.zeros((2, 16), np.float32)
    w[1] = 1e-9                       # would underflow fp16 if rounded to nearest
    qt = quantize(w, 4, 16)
    assert (qt.scale > 0).all() and np.isfinite(dequantize(qt)).all()
    assert (dequantize(qt)[0] == 0).all()
    with pytest.raises(MoecError, match="float16"):
        quantize(np.full((1, 16), 1e6, np.float32), 2, 16)


@pytest.mark.parametrize("bits", [0, 1, 7, 16, 32, 4.0, True, "4"])
def test_bad_bits(bits):
    with pytest.raises(MoecError, match="choices: 2, 3, 4, 5, 6, 8"):
        quantize(np.zeros((2, 64), np.float32), bits, 32)


@pytest.mark.parametrize("group", [0, 4, 48, 96, 65, -32])
def test_bad_group_size(group):
    with pytest.raises(MoecError, match="group_size"):
        quantize(np.zeros((2, 64), np.float32), 4, group)


def test_small_divisor_group_accepted():
    qt = quantize(np.ones((2, 24), np.float32), 4, 8)
    assert qt.scale.shape == (2, 3)


@pytest.mark.parametrize("w, match", [
    (np.zeros(64, np.float32), "2-D"),
    (np.zeros((2, 64), np.int32), "floating"),
    (np.full((2, 64), np.nan, np.float32), "NaN"),
])
def test_bad_weight(w, match):
    with pytest.raises(MoecError, match=match):
        quantize(w, 4, 32)


def test_bad_method_and_importance():
    w = np.zeros((2, 64), np.float32)
    with pytest.raises(MoecError, match="choices: hqq, mse, rtn"):
        quantize(w, 4, 32, method="gptq")
    with pytest.raises(MoecError, match="importance"):
        quantize(w, 4, 32, method="mse", importance=np.ones(32))
    with pytest.raises(MoecError, match="non-negative"):
        quantize(w, 4, 32, method="mse", importance=-np.ones(64))


def test_quantized_tensor_validates_shapes():
    q = np.zeros((2, 64), np.uint8)
    with pytest.raises(MoecError, match="scale"):
        QuantizedTensor(q=q, scale=np.ones((2, 3), np.float16), zero=np.zeros((2, 2), np.uint8),
                        bits=4, group_size=32)
    qt = QuantizedTensor(q=q, scale=np.ones((2, 2), np.float16), zero=np.zeros((2, 2), np.uint8),
                         bits=4, group_size=32)
    assert qt.shape == (2, 64)
