"""Bit packing of quantized values, one layout for all widths: an LSB-first bit stream along K.

Layout (each row packed independently): value ``i`` of a row occupies bits ``[i*b, (i+1)*b)``
of the row's little-endian bit stream, its least significant bit first; byte ``j`` of the packed
row holds stream bits ``[8j, 8j+8)`` (stream bit ``8j + t`` is bit ``t`` of byte ``j``). A row of
K values takes ``ceil(K*b/8)`` bytes; unused high bits of the last byte are 0.

Examples: 4-bit value 0 is the low nibble of byte 0 and value 1 its high nibble; 2-bit value 0
is bits 0-1 of byte 0; 3-bit values 0..7 fill bytes 0..2 (value 2 straddles bytes 0 and 1);
8-bit is the identity.

This is onnxruntime ``MatMulNBits``' layout for 2/4/8 bits: its ``B`` input
``[N, K/block, block*bits/8]`` is a reshape of our ``[N, K*bits/8]`` whenever ``block*bits`` is
a multiple of 8, and its packed zero points ``[N * ceil(G*bits/8)]`` are :func:`pack_zeros`
flattened. :func:`packed_nbytes` is the single source of truth for memory accounting.
"""

from __future__ import annotations

import numpy as np

from moec.core.formats import DEFAULT_SCALES, FORMATS, get_scale_format
from moec.core.errors import MoecError
from moec.quant.quantize import check_bits, check_group_size

_LANE = 8  # values per chunk: 8 values of b <= 8 bits fill exactly b bytes (<= one uint64)
_BLOCK_VALUES = 1 << 20  # values per row block: ~8 MiB of uint64 scratch


def _rows_per_block(k: int) -> int:
    return max(1, _BLOCK_VALUES // max(k, 1))


def _check_pack_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise MoecError(f"cannot pack {bits!r}-bit values; bits must be in 1..8")


def packed_row_bytes(k: int, bits: int) -> int:
    """Bytes of one packed row of ``k`` ``bits``-bit values: ``ceil(k * bits / 8)``."""
    return -(-k * bits // 8)


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint8 ``q [N, K]`` (values < ``2**bits``) into uint8 ``[N, ceil(K*bits/8)]``.

    Parameters
    ----------
    q : np.ndarray
        uint8 ``[N, K]`` quantized values.
    bits : int
        Bit width, 1..8.

    Returns
    -------
    np.ndarray
        uint8 ``[N, ceil(K*bits/8)]`` in the module's LSB-first bit-stream layout.
    """
    _check_pack_bits(bits)
    q = np.asarray(q)
    if q.ndim != 2 or q.dtype != np.uint8:
        raise MoecError(f"pack expects a 2-D uint8 array, got {q.dtype} {q.shape}")
    if q.size and int(q.max()) >= 1 << bits:
        raise MoecError(f"value {int(q.max())} does not fit in {bits} bits")
    n, k = q.shape
    out = np.empty((n, packed_row_bytes(k, bits)), dtype=np.uint8)
    step = _rows_per_block(k)  # row blocks bound the uint64 scratch memory
    for r0 in range(0, n, step):
        out[r0:r0 + step] = _pack_rows(q[r0:r0 + step], bits)
    return out


def _pack_rows(q: np.ndarray, bits: int) -> np.ndarray:
    n, k = q.shape
    chunks = -(-k // _LANE)
    lanes = np.zeros((n, chunks * _LANE), dtype=np.uint64)
    lanes[:, :k] = q
    # Each chunk of 8 values becomes one little-endian uint64 holding 8*bits stream bits.
    shifts = np.arange(_LANE, dtype=np.uint64) * np.uint64(bits)
    words = np.bitwise_or.reduce(lanes.reshape(n, chunks, _LANE) << shifts, axis=-1)
    raw = words.astype("<u8").view(np.uint8).reshape(n, chunks, 8)[:, :, :bits]
    return raw.reshape(n, chunks * bits)[:, :packed_row_bytes(k, bits)]


def unpack(packed: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Inverse of :func:`pack`: uint8 ``[N, ceil(k*bits/8)]`` -> uint8 ``[N, k]``.

    Parameters
    ----------
    packed : np.ndarray
        uint8 ``[N, ceil(k*bits/8)]``.
    bits : int
        Bit width, 1..8.
    k : int
        Number of values per row.

    Returns
    -------
    np.ndarray
        uint8 ``[N, k]``.
    """
    _check_pack_bits(bits)
    packed = np.asarray(packed)
    if packed.ndim != 2 or packed.dtype != np.uint8:
        raise MoecError(f"unpack expects a 2-D uint8 array, got {packed.dtype} {packed.shape}")
    if packed.shape[1] != packed_row_bytes(k, bits):
        raise MoecError(f"packed rows have {packed.shape[1]} bytes, expected "
                        f"{packed_row_bytes(k, bits)} for k={k} at {bits} bits")
    out = np.empty((packed.shape[0], k), dtype=np.uint8)
    step = _rows_per_block(k)
    for r0 in range(0, packed.shape[0], step):
        out[r0:r0 + step] = _unpack_rows(packed[r0:r0 + step], bits, k)
    return out


def _unpack_rows(packed: np.ndarray, bits: int, k: int) -> np.ndarray:
    n = packed.shape[0]
    chunks = -(-k // _LANE)
    raw = np.zeros((n, chunks * bits), dtype=np.uint8)
    raw[:, :packed.shape[1]] = packed
    buf = np.zeros((n, chunks, 8), dtype=np.uint8)
    buf[:, :, :bits] = raw.reshape(n, chunks, bits)
    words = buf.view("<u8")  # [n, chunks, 1]
    shifts = np.arange(_LANE, dtype=np.uint64) * np.uint64(bits)
    vals = (words >> shifts) & np.uint64((1 << bits) - 1)
    return vals.reshape(n, chunks * _LANE)[:, :k]


def pack_zeros(zero: np.ndarray, bits: int) -> np.ndarray:
    """Pack integer zero points ``[N, G]`` with the same per-row rule: uint8 ``[N, ceil(G*bits/8)]``."""
    return pack(zero, bits)


def packed_nbytes(n: int, k: int, bits: int, group_size: int, scales: str = DEFAULT_SCALES) -> dict[str, int]:
    """Exact storage of one ``[n, k]`` weight at ``bits`` with ``group_size``: the accounting source.

    Parameters
    ----------
    n, k : int
        ``out_features`` and ``in_features``.
    bits : int
        One of ``SUPPORTED_BITS``, or 16 for a weight kept as float16 (no scales, no zeros).
    group_size : int
        Group size along K (must divide ``k``; ignored for 16 bits).
    scales : str
        Scale format (``moec.core.formats.SCALE_FORMATS``): ``fp16`` or ``u8`` (uint8 codes per
        group plus a float16 super-scale per super-block of a row).

    Returns
    -------
    dict[str, int]
        ``weight`` (packed values, ``n * ceil(k*bits/8)``), ``scales`` (fp16: 2 bytes per group;
        u8: 1 byte per group + 2 per super-block),
        ``zeros`` (packed, ``n * ceil(G*bits/8)``) and ``total``, all in bytes.
    """
    fmt = FORMATS.get(int(bits)) if isinstance(bits, (int, np.integer)) and not isinstance(bits, bool) else None
    if fmt is not None and not fmt.quantized:
        weight, scales, zeros = n * k * np.dtype(np.float16).itemsize, 0, 0
    else:
        check_bits(bits)
        check_group_size(group_size, k)
        groups = k // group_size
        weight = n * packed_row_bytes(k, bits)
        scales = get_scale_format(scales).scale_bytes(n, groups)
        zeros = n * packed_row_bytes(groups, bits)
    return {"weight": weight, "scales": scales, "zeros": zeros, "total": weight + scales + zeros}

