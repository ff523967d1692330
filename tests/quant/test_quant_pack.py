"""Packing: round trips, the documented LSB-first bit order, onnxruntime's layout and byte accounting."""

from __future__ import annotations

import numpy as np
import pytest

from moec.core.errors import MoecError
from moec.quant import (SUPPORTED_BITS, dequantize, pack, pack_zeros, packed_nbytes, quantize,
                        unpack)


def naive_pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Bit by bit from the documented definition."""
    n, k = q.shape
    out = np.zeros((n, -(-k * bits // 8)), np.uint8)
    for r in range(n):
        for i in range(k):
            for t in range(bits):
                pos = i * bits + t
                out[r, pos // 8] |= ((int(q[r, i]) >> t) & 1) << (pos % 8)
    return out


@pytest.mark.parametrize("bits", [1, *SUPPORTED_BITS])
@pytest.mark.parametrize("k", [1, 5, 8, 13, 64, 100])
def test_round_trip_and_naive(bits, k):
    rng = np.random.default_rng(bits * 1000 + k)
    q = rng.integers(0, 2**bits, size=(3, k), dtype=np.uint8)
    packed = pack(q, bits)
    assert packed.dtype == np.uint8 and packed.shape == (3, -(-k * bits // 8))
    np.testing.assert_array_equal(packed, naive_pack(q, bits))
    np.testing.assert_array_equal(unpack(packed, bits, k), q)


def test_hand_checked_bit_order():
    # 3 bits: stream = 1 | 2<<3 | 3<<6 | 4<<9 | 5<<12 | 6<<15 | 7<<18 | 0<<21 = 0x1F58D1.
    # byte 0 = 0b11_010_001: v0=001, v1=010, low two bits of v2=11.
    q3 = np.array([[1, 2, 3, 4, 5, 6, 7, 0]], np.uint8)
    np.testing.assert_array_equal(pack(q3, 3), [[0xD1, 0x58, 0x1F]])
    # 4 bits: value 0 is the low nibble; an odd K leaves the last high nibble 0.
    np.testing.assert_array_equal(pack(np.array([[1, 2, 3]], np.uint8), 4), [[0x21, 0x03]])
    # 2 bits: 1 | 2<<2 | 3<<4 | 0<<6 = 0x39, then 1.
    np.testing.assert_array_equal(pack(np.array([[1, 2, 3, 0, 1]], np.uint8), 2), [[0x39, 0x01]])
    # 5 bits: 31 | 1<<5 = 0x3F, then bits 8..9 of the stream = 0.
    np.testing.assert_array_equal(pack(np.array([[31, 1]], np.uint8), 5), [[0x3F, 0x00]])
    # 6 bits: 1 | 63<<6 = 0xFC1 -> bytes 0xC1, 0x0F.
    np.testing.assert_array_equal(pack(np.array([[1, 63]], np.uint8), 6), [[0xC1, 0x0F]])
    q8 = np.array([[0, 7, 200, 255]], np.uint8)
    np.testing.assert_array_equal(pack(q8, 8), q8)


def test_4bit_matches_matmulnbits_nibbles():
    q = np.random.default_rng(0).integers(0, 16, size=(4, 64), dtype=np.uint8)
    expected = q[:, 0::2] | (q[:, 1::2] << 4)  # low nibble = even index
    np.testing.assert_array_equal(pack(q, 4), expected)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_onnxruntime_matmulnbits_agrees(bits):
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper

    n, k, block = 8, 64, 32
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((n, k)).astype(np.float32)
    qt = quantize(w, bits, block)
    blob = pack(qt.q, bits).reshape(n, k // block, block * bits // 8)
    zeros = pack_zeros(qt.zero, bits).reshape(-1)
    scales = qt.scale.astype(np.float32).reshape(-1)
    node = helper.make_node("MatMulNBits", ["A", "B", "scales", "zp"], ["Y"], domain="com.microsoft",
                            K=k, N=n, bits=bits, block_size=block)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [2, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, n])],
        initializer=[helper.make_tensor("B", TensorProto.UINT8, blob.shape, blob.tobytes(), raw=True),
                     helper.make_tensor("scales", TensorProto.FLOAT, scales.shape, scales),
                     helper.make_tensor("zp", TensorProto.UINT8, zeros.shape, zeros.tobytes(),
                                        raw=True)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    try:
        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # an onnxruntime build without this bit width
        pytest.skip(f"MatMulNBits bits={bits} unavailable: {exc}")
    x = rng.standard_normal((2, k)).astype(np.float32)
    (y,) = sess.run(None, {"A": x})
    np.testing.assert_allclose(y, x @ dequantize(qt).T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("n, k, group", [(8, 96, 32), (5, 128, 64), (3, 384, 128), (2, 24, 8)])
def test_packed_nbytes_matches_arrays(bits, n, k, group):
    w = np.random.default_rng(0).standard_normal((n, k)).astype(np.float32)
    qt = quantize(w, bits, group)
    got = packed_nbytes(n, k, bits, group)
    assert got["weight"] == pack(qt.q, bits).nbytes
    assert got["scales"] == qt.scale.nbytes
    assert got["zeros"] == pack_zeros(qt.zero, bits).nbytes
    assert got["total"] == got["weight"] + got["scales"] + got["zeros"]


def test_packed_nbytes_float_and_errors():
    assert packed_nbytes(4, 64, 16, 32) == {"weight": 512, "scales": 0, "zeros": 0, "total": 512}
    with pytest.raises(MoecError, match="choices"):
        packed_nbytes(4, 64, 7, 32)
    with pytest.raises(MoecError, match="group_size"):
        packed_nbytes(4, 64, 4, 48)


def test_pack_errors():
    with pytest.raises(MoecError, match="does not fit"):
        pack(np.array([[4]], np.uint8), 2)
    with pytest.raises(MoecError, match="1..8"):
        pack(np.zeros((1, 4), np.uint8), 9)
    with pytest.raises(MoecError, match="uint8"):
        pack(np.zeros((1, 4), np.int64), 4)
    with pytest.raises(MoecError, match="expected 2"):
        unpack(np.zeros((1, 3), np.uint8), 4, 4)


def test_pack_large_is_vectorised():
    q = np.random.default_rng(0).integers(0, 8, size=(1024, 4096), dtype=np.uint8)
    np.testing.assert_array_equal(unpack(pack(q, 3), 3, 4096), q)
