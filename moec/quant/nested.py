"""Nested (any-precision) expert weights: one stored width, every lower width derived by bit-plane slicing.

A routed expert quantized once at ``storage_bits`` (8 or 4, affine per group: ``w ≈ (q − zero)·scale``)
is split into the bit-plane segments of its :class:`~moec.core.formats.NestedFormat`, most
significant first (8 bits: 2 + 1 + 1 + 4). Segment ``s`` holds bits ``[pos_s, pos_s + width_s)`` of
every code, packed as its own LSB-first stream (``moec.quant.pack``), so a width-``k`` read touches
the segments whose prefix sum is ``<= k`` and nothing else: ``k / storage_bits`` of the code bytes.

Derived width ``k`` (``s = storage_bits − k``): the code is the top ``k`` bits, ``q_k = q >> s``, and it
dequantizes at the centre of the ``2**s`` stored codes it stands for::

    w_k = scale · (2**s · q_k − zero + (2**s − 1) / 2)

so ``scale_k = scale · 2**s`` and ``zero_k = (zero + 0.5) / 2**s − 0.5`` (fractional, in ``k``-bit
units). Truncation needs no carry from the dropped bits, which is what lets a kernel read only the
top planes (Any-Precision LLM's rule; Matryoshka Quantization rounds instead, which would need the
low bits). ``k == storage_bits`` is the stored weight exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moec.core.errors import MoecError
from moec.core.formats import NestedFormat, get_nested_format
from moec.quant.pack import pack, unpack
from moec.quant.packed_model import PackedWeight


@dataclass
class NestedWeight:
    """One ``[N, K]`` expert weight in nested storage.

    Attributes
    ----------
    shape : tuple[int, int]
    storage_bits : int
        Width of the stored codes (a key of ``NESTED_FORMATS``).
    group_size : int
    segments : list[np.ndarray]
        uint8 ``[N, ceil(K * width_s / 8)]`` per segment, most significant first (``pack`` layout).
    scale : np.ndarray
        float16 ``[N, G]`` of the stored width.
    zero : np.ndarray
        uint8 ``[N, ceil(G * storage_bits / 8)]``, packed zero codes of the stored width.
    """

    shape: tuple[int, int]
    storage_bits: int
    group_size: int
    segments: list[np.ndarray]
    scale: np.ndarray
    zero: np.ndarray

    @property
    def format(self) -> NestedFormat:
        return get_nested_format(self.storage_bits)

    def codes(self) -> np.ndarray:
        """The stored ``storage_bits``-bit codes, uint8 ``[N, K]``, reassembled from the segments."""
        return derived_codes(self, self.storage_bits)

    def zeros(self) -> np.ndarray:
        """Stored zero codes, uint8 ``[N, G]``."""
        return unpack(self.zero, self.storage_bits, self.shape[1] // self.group_size)

    def nbytes(self, bits: int | None = None) -> int:
        """Bytes read to serve width ``bits`` (default: all stored): its segments, scales, zeros."""
        k = self.storage_bits if bits is None else bits
        used = segments_for(self.format, k)
        return sum(self.segments[s].nbytes for s in range(used)) + self.scale.nbytes + self.zero.nbytes


def segment_positions(fmt: NestedFormat) -> list[int]:
    """Bit position of each segment's least significant bit inside the stored code."""
    out, top = [], fmt.storage_bits
    for width in fmt.segment_bits:
        top -= width
        out.append(top)
    return out


def segments_for(fmt: NestedFormat, bits: int) -> int:
    """How many leading segments width ``bits`` reads; a one-line error for a width not served."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or int(bits) not in fmt.derived_bits:
        raise MoecError(f"{fmt.name} storage serves {', '.join(map(str, fmt.derived_bits))} bits, not {bits!r}")
    return fmt.derived_bits.index(int(bits)) + 1


def nest(pw: PackedWeight) -> NestedWeight:
    """Split a packed ``storage_bits``-bit weight (8 or 4) into its nested bit-plane segments."""
    fmt = get_nested_format(pw.bits)
    n, k = pw.shape
    q = unpack(pw.packed, pw.bits, k)
    segments = []
    for width, pos in zip(fmt.segment_bits, segment_positions(fmt)):
        segments.append(pack(((q >> pos) & ((1 << width) - 1)).astype(np.uint8), width))
    return NestedWeight(pw.shape, pw.bits, pw.group_size, segments, pw.scale, pw.zero)


def derived_codes(nw: NestedWeight, bits: int) -> np.ndarray:
    """``q >> (storage_bits − bits)`` assembled from the first segments only: uint8 ``[N, K]``."""
    fmt = nw.format
    used = segments_for(fmt, bits)
    k = nw.shape[1]
    out = np.zeros(nw.shape, np.uint8)
    shift = fmt.storage_bits - bits
    for s, (width, pos) in enumerate(zip(fmt.segment_bits[:used], segment_positions(fmt)[:used])):
        out |= (unpack(nw.segments[s], width, k) << (pos - shift)).astype(np.uint8)
    return out


def derived_params(nw: NestedWeight, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Width ``bits``: codes uint8 ``[N, K]``, scale float32 ``[N, G]``, fractional zero float32 ``[N, G]``.

    ``w = (codes − zero) · scale`` group-wise (module docstring).
    """
    codes = derived_codes(nw, bits)
    s = nw.storage_bits - bits
    scale = nw.scale.astype(np.float32) * np.float32(2 ** s)
    zero = (nw.zeros().astype(np.float32) + np.float32(0.5)) / np.float32(2 ** s) - np.float32(0.5)
    return codes, scale, zero


def dequantize_nested(nw: NestedWeight, bits: int) -> np.ndarray:
    """The width-``bits`` weight of ``nw`` as float32 ``[N, K]``."""
    codes, scale, zero = derived_params(nw, bits)
    n, k = nw.shape
    g = k // nw.group_size
    w = (codes.reshape(n, g, nw.group_size).astype(np.float32) - zero[:, :, None]) * scale[:, :, None]
    return w.reshape(n, k)
