"""Nested (any-precision) expert storage: segments, derived widths against a numpy reference and
against quantizing directly at the derived width."""

from __future__ import annotations

import numpy as np
import pytest

from moec.core.errors import MoecError
from moec.core.formats import NESTED_FORMATS, get_nested_format
from moec.quant.nested import dequantize_nested, derived_codes, nest
from moec.quant.packed_model import pack_weight


def _weight(seed=0, n=32, k=128):
    return np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)


def test_formats_list_their_derived_widths():
    assert get_nested_format(8).derived_bits == (2, 3, 4, 8)
    assert get_nested_format(4).derived_bits == (2, 3, 4)
    assert all(sum(f.segment_bits) == b for b, f in NESTED_FORMATS.items())
    with pytest.raises(MoecError, match="no nested storage at 6 bits; choices: 4, 8"):
        get_nested_format(6)


@pytest.mark.parametrize("storage", [8, 4])
def test_derived_weights_match_a_numpy_reference(storage):
    pw = pack_weight(_weight(), storage, 32)
    nw = nest(pw)
    from moec.quant.pack import unpack
    q = unpack(pw.packed, storage, 128).astype(np.int64)
    z = unpack(pw.zero, storage, 4).astype(np.float64)
    scale = pw.scale.astype(np.float64)
    assert np.array_equal(nw.codes(), q.astype(np.uint8))
    assert np.allclose(dequantize_nested(nw, storage), pw.dequantize(), atol=0)  # the stored weight itself
    for bits in get_nested_format(storage).derived_bits:
        s = storage - bits
        qk = q >> s
        assert np.array_equal(derived_codes(nw, bits), qk.astype(np.uint8))
        ref = scale.repeat(32, 1) * (qk * 2 ** s - z.repeat(32, 1) + (2 ** s - 1) / 2)
        assert np.allclose(dequantize_nested(nw, bits), ref, atol=1e-5)


def test_reading_k_bits_reads_k_over_b_of_the_code_bytes():
    nw = nest(pack_weight(_weight(), 8, 32))
    code = [sum(s.nbytes for s in nw.segments[:i]) for i in range(1, 5)]
    full = code[-1]
    assert [c / full for c in code] == [2 / 8, 3 / 8, 4 / 8, 1.0]
    side = nw.scale.nbytes + nw.zero.nbytes
    assert [nw.nbytes(b) - side for b in (2, 3, 4, 8)] == code
    with pytest.raises(MoecError, match="nested8 storage serves 2, 3, 4, 8 bits, not 5"):
        nw.nbytes(5)


@pytest.mark.parametrize("storage", [8, 4])
def test_derived_error_is_close_to_direct_quantization(storage):
    w = _weight(1, 64, 256)
    nw = nest(pack_weight(w, storage, 32))
    for bits in get_nested_format(storage).derived_bits[:-1]:
        nested = float(np.mean((dequantize_nested(nw, bits) - w) ** 2))
        direct = float(np.mean((pack_weight(w, bits, 32).dequantize() - w) ** 2))
        # bin-centre truncation of a finer grid is about as good as rounding to a min-max grid
        assert nested < 1.3 * direct, (bits, nested, direct)
