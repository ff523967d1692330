"""Kernel layout: round trip against pack/unpack and the kernels' bit-extraction model."""

from __future__ import annotations

import numpy as np
import pytest

from moec.core.errors import MoecError
from moec.lower.kernels.layout import (from_kernel_layout, kernel_codes, stack_kernel_layouts,
                                       to_kernel_layout, zero_words)
from moec.quant.pack import unpack
from moec.quant.packed_model import pack_weight


def _weight(n: int, k: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("n,k,gs,tile", [(32, 64, 32, 16), (48, 384, 128, 16), (8, 96, 32, 4),
                                         (16, 64, 16, 16), (80, 64, 32, 64)])
def test_codes_and_zeros_match_unpack(bits, n, k, gs, tile):
    if gs * bits % 32:
        pytest.skip("group does not hold whole words (refused, see test_unsupported_shapes_raise)")
    pw = pack_weight(_weight(n, k), bits, gs)
    lay = to_kernel_layout(pw, tile=tile)
    groups, nt = k // gs, -(-n // tile)
    assert lay["weight"].shape == (nt, k * bits // 32, tile)
    assert lay["weight"].dtype == np.uint32
    assert lay["scale"].shape == (nt, groups, tile) and lay["scale"].dtype == np.float16
    assert lay["zero"].shape == (nt, zero_words(groups, bits), tile)
    np.testing.assert_array_equal(kernel_codes(lay["weight"], bits, k, n), unpack(pw.packed, bits, k))
    np.testing.assert_array_equal(kernel_codes(lay["zero"], bits, groups, n),
                                  unpack(pw.zero, bits, groups))
    # Padded rows of a partial last tile are zeros (scale 0: they contribute nothing).
    assert not lay["scale"][-1, :, n - (nt - 1) * tile:].any()
    # Same bytes when the tile divides N: only the zero points may gain one pad word per row.
    if n % tile == 0:
        extra = sum(a.nbytes for a in lay.values()) - pw.nbytes
        assert 0 <= extra <= n * 4 + n * 3  # pad word + rounding of the zero stream to words


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8, 16])
def test_round_trip_is_byte_identical(bits):
    pw = pack_weight(_weight(80, 128, seed=bits), bits, 64)  # 80 rows: a padded last tile
    back = from_kernel_layout(to_kernel_layout(pw), bits, pw.shape, pw.group_size)
    for name in ("packed", "scale", "zero"):
        a, b = getattr(pw, name), getattr(back, name)
        if a is None:
            assert b is None
        else:
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)


def test_rows_are_interleaved_by_tile():
    w = _weight(32, 8)
    lay = to_kernel_layout(w, tile=16)["weight"]
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
    (16, 64, 16, 3, "group_size"),
    (16, 64, 8, 6, "group_size"),
])
def test_unsupported_shapes_raise(n, k, gs, bits, match):
    with pytest.raises(MoecError, match=match):
        to_kernel_layout(pack_weight(_weight(n, k), bits, gs))
