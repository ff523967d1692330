"""Kernel layout: round trip against pack/unpack and the kernels' bit-extraction model."""

from __future__ import annotations

import numpy as np
import pytest

from moec.errors import MoecError
from moec.lower.kernels.layout import (from_kernel_layout, kernel_codes, stack_kernel_layouts,
                                       to_kernel_layout, zero_words)
from moec.quant.pack import unpack
from moec.quant.packed_model import pack_weight


def _weight(n: int, k: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n,k,gs,lanes", [(32, 64, 32, 16), (48, 384, 128, 16), (8, 96, 32, 4), (16, 64, 16, 16)])
def test_codes_and_zeros_match_unpack(bits, n, k, gs, lanes):
    if gs * bits % 32:
        pytest.skip("group does not hold whole words (refused, see test_unsupported_shapes_raise)")
    pw = pack_weight(_weight(n, k), bits, gs)
    lay = to_kernel_layout(pw, lanes=lanes)
    groups = k // gs
    assert lay["weight"].shape == (n // lanes, k * bits // 32, lanes)
    assert lay["weight"].dtype == np.uint32
    assert lay["scale"].shape == (n // lanes, groups, lanes) and lay["scale"].dtype == np.float16
    assert lay["zero"].shape == (n // lanes, zero_words(groups, bits), lanes)
    np.testing.assert_array_equal(kernel_codes(lay["weight"], bits, k), unpack(pw.packed, bits, k))
    np.testing.assert_array_equal(kernel_codes(lay["zero"], bits, groups), unpack(pw.zero, bits, groups))
    # Same bytes: only the zero points may gain one pad word per row (3 bits).
    extra = sum(a.nbytes for a in lay.values()) - pw.nbytes
    assert 0 <= extra <= n * 4 + n * 3  # pad word + rounding of the zero stream to words


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
def test_round_trip_is_byte_identical(bits):
    pw = pack_weight(_weight(32, 128, seed=bits), bits, 64)
    back = from_kernel_layout(to_kernel_layout(pw), bits, pw.shape, pw.group_size)
    for name in ("packed", "scale", "zero"):
        a, b = getattr(pw, name), getattr(back, name)
        if a is None:
            assert b is None
        else:
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)


def test_rows_are_interleaved_by_lane():
    w = _weight(32, 8)
    lay = to_kernel_layout(w, lanes=16)["weight"]
    assert lay.shape == (2, 8, 16)
    np.testing.assert_array_equal(lay[1, 3, 5], w[16 + 5, 3])


def test_stack_checks_shapes():
    a = to_kernel_layout(pack_weight(_weight(16, 64), 4, 32))
    b = to_kernel_layout(pack_weight(_weight(16, 64), 2, 32))
    assert stack_kernel_layouts([a, a])["weight"].shape == (2,) + a["weight"].shape
    with pytest.raises(MoecError, match="share"):
        stack_kernel_layouts([a, b])
    with pytest.raises(MoecError, match="empty"):
        stack_kernel_layouts([])


@pytest.mark.parametrize("n,k,gs,bits,match", [
    (24, 64, 32, 4, "multiple of the lane count"),
    (16, 64, 16, 3, "group_size"),
    (16, 64, 32, 5, "no kernel for 5-bit"),
])
def test_unsupported_shapes_raise(n, k, gs, bits, match):
    with pytest.raises(MoecError, match=match):
        to_kernel_layout(pack_weight(_weight(n, k), bits, gs))
