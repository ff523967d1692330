"""Kernel layout: the packed LSB-first weights re-tiled as row-interleaved uint32 words for vector code.

One function, :func:`to_kernel_layout`, derives it from a :class:`PackedWeight`; nothing else in
the bits changes. For a quantized ``[N, K]`` weight at ``b`` bits with group size ``gs`` and a
row tile of ``T`` rows (the target family's choice for the kernels that read it,
``kernel_tile(target, N, b, activations)``: on x86 with int8 activations at 2 and 4 bits the largest
power-of-two divisor of ``N`` up to 128, else 16; on ARM 16):

- ``weight`` uint32 ``[NT, K*b/32, T]`` (``NT = ceil(N/T)``): each row's packed byte stream
  (``pack``'s layout, value ``i`` at stream bits ``[i*b, (i+1)*b)``) read as little-endian
  uint32 words, so value ``i`` sits in word ``(i*b)//32`` at bit ``(i*b)%32``; a 3-, 5- or
  6-bit value can straddle two words (low bits at the top of word ``w``, the rest at the bottom of word
  ``w+1``). Word ``w`` of the tile's rows ``t*T .. t*T+T-1`` is stored contiguously: a vector
  load fetches the same word of consecutive rows (every lane computes one output row, no
  horizontal sums), and each tile is one sequential stream of ``K*b/32`` words.
- ``scale`` float16 ``[NT, G, T]`` (``G = K/gs``): the fp16 scales, rows interleaved the same way;
  with double-quantized scales (format ``u8``) the uint8 scale codes ``[NT, G, T]``, followed by
  ``super_scale`` float16 ``[NT, ceil(G/8), T]`` (one per super-block of a row, same interleave).
- ``zero`` uint32 ``[NT, ZW, T]``: each row's packed zero-point stream (``pack_zeros``) as
  uint32 words, ``ZW = ceil(G*b/32)`` plus one zero word when ``b`` does not divide 32, so the
  two-word read of a straddling zero point stays in bounds.

Float weights (``bits == 16``, or a float32 ndarray) become ``weight`` ``[NT, K, T]`` in their
own dtype. Rows past ``N`` in the last tile are zeros (scale 0): only when ``T`` does not divide
``N``. Requirement (checked): for quantized weights ``gs * b % 32 == 0``, so every group is a
whole number of words (any multiple of 32; 16 also works at 2/4/8 bits). Otherwise the bytes
are the packed ones, plus the optional zero pad word.
"""

from __future__ import annotations

import numpy as np

from moec.core.errors import MoecError
from moec.quant.pack import packed_row_bytes, unpack
from moec.core.formats import FLOAT_BITS, kernel_bits
from moec.quant.nested import NestedWeight
from moec.quant.packed_model import PackedWeight

#: Default row tile (one 16-lane vector); kernels want ``kernel_tile(target, n, bits, activations)``.
DEFAULT_TILE = 16

#: Bit widths the quantized CPU kernels decode (x86 and arm share the layout and the formats).
KERNEL_BITS: tuple[int, ...] = kernel_bits("x86")


def zero_words(groups: int, bits: int) -> int:
    """uint32 words per row of the kernel-layout zero points (with the straddle pad word)."""
    return -(-groups * bits // 32) + (0 if 32 % bits == 0 else 1)


def check_kernel_shape(bits: int, n: int, k: int, group_size: int) -> None:
    """Raise :class:`MoecError` unless the kernels support this weight shape.

    Parameters
    ----------
    bits : int
        One of :data:`KERNEL_BITS`, 16 (float16) or 32 (float32).
    n, k : int
        ``out_features`` and ``in_features``.
    group_size : int
        Quantization group size along K (ignored for float weights).
    """
    if bits not in KERNEL_BITS + (16, 32):
        raise MoecError(f"no kernel for {bits}-bit weights; choices: "
                        f"{', '.join(map(str, KERNEL_BITS + (16, 32)))}")
    if n < 1 or k < 1:
        raise MoecError(f"bad kernel shape n={n} k={k}")
    if bits in KERNEL_BITS:
        if group_size < 1 or k % group_size or (group_size * bits) % 32:
            raise MoecError(f"{bits}-bit kernels need group_size ({group_size}) to divide K ({k}) "
                            f"and hold whole uint32 words (group_size * bits % 32 == 0)")


def num_tiles(n: int, tile: int) -> int:
    """Row tiles of an ``n``-row weight: ``ceil(n / tile)``."""
    return -(-n // tile)


def _row_words(packed: np.ndarray, words: int) -> np.ndarray:
    """uint8 ``[N, B]`` rows -> little-endian uint32 ``[N, words]`` (zero-padded)."""
    n, nbytes = packed.shape
    buf = np.zeros((n, words * 4), dtype=np.uint8)
    buf[:, :nbytes] = packed
    return buf.view("<u4").astype(np.uint32)


def _interleave(a: np.ndarray, tile: int) -> np.ndarray:
    """``[N, C]`` -> ``[NT, C, T]``: element ``[t, c, r]`` is row ``t*T + r`` (zeros past ``N``)."""
    n, c = a.shape
    padded = np.zeros((num_tiles(n, tile) * tile, c), dtype=a.dtype)
    padded[:n] = a
    return np.ascontiguousarray(padded.reshape(-1, tile, c).transpose(0, 2, 1))


def _deinterleave(a: np.ndarray, n: int) -> np.ndarray:
    nt, c, tile = a.shape
    return np.ascontiguousarray(a.transpose(0, 2, 1).reshape(nt * tile, c)[:n])


def to_kernel_layout(pw: PackedWeight | np.ndarray, tile: int = DEFAULT_TILE) -> dict[str, np.ndarray]:
    """The kernel layout (module docstring) of one weight.

    Parameters
    ----------
    pw : PackedWeight | np.ndarray
        A packed weight (2, 3, 4, 5, 6, 8 bits or 16 = float16), or a float32 ``[N, K]`` array for the
        float32 kernel.
    tile : int
        Rows per tile; the target family's schedules say which (``kernel_tile(target, n, bits, activations)``).

    Returns
    -------
    dict[str, np.ndarray]
        ``{"weight", "scale", "zero"}`` for quantized weights, ``{"weight"}`` for float ones.

    Raises
    ------
    MoecError
        On a bit width or group size the kernels do not support.
    """
    if tile < 1:
        raise MoecError(f"tile must be >= 1, got {tile}")
    if isinstance(pw, np.ndarray):
        if pw.ndim != 2 or pw.dtype != np.float32:
            raise MoecError(f"float32 kernel layout needs a 2-D float32 array, got {pw.dtype} {pw.shape}")
        check_kernel_shape(32, *pw.shape, 1)
        return {"weight": _interleave(pw, tile)}
    n, k = pw.shape
    if pw.bits == FLOAT_BITS:
        check_kernel_shape(16, n, k, pw.group_size)
        return {"weight": _interleave(np.asarray(pw.packed, dtype=np.float16), tile)}
    check_kernel_shape(pw.bits, n, k, pw.group_size)
    groups = k // pw.group_size
    out = {"weight": _interleave(_row_words(pw.packed, k * pw.bits // 32), tile)}
    if pw.super_scale is not None:
        out["scale"] = _interleave(np.asarray(pw.scale, dtype=np.uint8), tile)
        out["super_scale"] = _interleave(np.asarray(pw.super_scale, dtype=np.float16), tile)
    else:
        out["scale"] = _interleave(np.asarray(pw.scale, dtype=np.float16), tile)
    out["zero"] = _interleave(_row_words(pw.zero, zero_words(groups, pw.bits)), tile)
    return out


def swiglu_weight(w1: PackedWeight | np.ndarray, w3: PackedWeight | np.ndarray) -> PackedWeight | np.ndarray:
    """``[w1; w3]`` (``2N`` rows) for the fused SwiGLU GEMV: packed rows, scales and zeros concatenated.

    Rows are packed independently, so the concatenation is still in ``pack``'s layout.
    """
    if isinstance(w1, np.ndarray):
        return np.concatenate([w1, w3]).astype(np.float32)
    if (w1.shape, w1.bits, w1.group_size, w1.scales) != (w3.shape, w3.bits, w3.group_size, w3.scales):
        raise MoecError("w1 and w3 must share shape, bits, group size and scale format")

    def cat(a, b):
        return None if a is None else np.concatenate([a, b])

    n, k = w1.shape
    return PackedWeight((2 * n, k), w1.bits, w1.group_size, cat(w1.packed, w3.packed),
                        cat(w1.scale, w3.scale), cat(w1.zero, w3.zero), w1.scales,
                        cat(w1.super_scale, w3.super_scale))


def stack_kernel_layouts(layouts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack per-expert kernel layouts of one bit class along a new leading expert axis ``E``."""
    if not layouts:
        raise MoecError("cannot stack an empty list of expert weights")
    keys = layouts[0].keys()
    for lay in layouts[1:]:
        if lay.keys() != keys or any(lay[key].shape != layouts[0][key].shape for key in keys):
            raise MoecError("stacked experts must share bit width, shape, group size and lanes")
    return {key: np.stack([lay[key] for lay in layouts]) for key in keys}


def from_kernel_layout(layout: dict[str, np.ndarray], bits: int, shape: tuple[int, int],
                       group_size: int, scales: str = "fp16") -> PackedWeight:
    """Inverse of :func:`to_kernel_layout` for one (unstacked) weight.

    Parameters
    ----------
    layout : dict[str, np.ndarray]
        What :func:`to_kernel_layout` returned.
    bits : int
        2, 3, 4, 5, 6, 8 or 16.
    shape : tuple[int, int]
        ``(N, K)``.
    group_size : int
        Quantization group size.

    Returns
    -------
    PackedWeight
        Byte-identical to the original.
    """
    n, k = shape
    if bits == FLOAT_BITS:
        return PackedWeight(shape, bits, group_size, _deinterleave(layout["weight"], n))
    groups = k // group_size

    def rows(a: np.ndarray, nbytes: int) -> np.ndarray:
        return np.ascontiguousarray(_deinterleave(a, n).astype("<u4").view(np.uint8)[:, :nbytes])

    sup = layout.get("super_scale")
    return PackedWeight(shape, bits, group_size, rows(layout["weight"], packed_row_bytes(k, bits)),
                        _deinterleave(layout["scale"], n),
                        rows(layout["zero"], packed_row_bytes(groups, bits)), scales,
                        None if sup is None else _deinterleave(sup, n))


def kernel_codes(words: np.ndarray, bits: int, count: int, n: int) -> np.ndarray:
    """Decode ``count`` codes of the ``n`` rows of kernel-layout words ``[NT, W, T]`` as the kernels do.

    A numpy model of the kernels' bit extraction (word ``(i*b)//32``, shift ``(i*b)%32``, the
    next word's low bits for a straddling value), used to test the layout against ``unpack``.

    Returns
    -------
    np.ndarray
        uint8 ``[N, count]``.
    """
    w = _deinterleave(words, n).astype(np.uint64)
    w = np.concatenate([w, np.zeros((w.shape[0], 1), np.uint64)], axis=1)
    idx = np.arange(count) * bits
    word, shift = idx // 32, (idx % 32).astype(np.uint64)
    window = w[:, word] | (w[:, word + 1] << np.uint64(32))
    return ((window >> shift) & np.uint64((1 << bits) - 1)).astype(np.uint8)


def unpacked_codes(pw: PackedWeight) -> np.ndarray:
    """``unpack`` of a packed weight's codes (the reference the layout is tested against)."""
    return unpack(pw.packed, pw.bits, pw.shape[1])


def nested_kernel_layout(nw: NestedWeight, tile: int = DEFAULT_TILE) -> dict[str, np.ndarray]:
    """The kernel layout of a nested weight: each bit-plane segment as its own nibble-lane word stream.

    ``seg{s}`` uint32 ``[NT, K*w_s/32, T]``, ``scale`` float16 ``[NT, G, T]`` and ``zero`` uint32
    ``[NT, ZW, T]`` (storage-width zero codes, as :func:`to_kernel_layout` lays out one weight).
    Each segment is a separate contiguous array, so a width that skips a segment skips its bytes.
    Segment words are in *nibble-lane* order (:func:`nibble_lane_words`), so the kernel rebuilds
    8 codes' top bits with one shift, mask and or per needed segment.
    """
    n, k = nw.shape
    groups = k // nw.group_size
    out = {f"seg{s}": _interleave(nibble_lane_words(unpack(seg, w, k), w, nw.group_size), tile)
           for s, (seg, w) in enumerate(zip(nw.segments, nw.format.segment_bits))}
    out["scale"] = _interleave(np.asarray(nw.scale, dtype=np.float16), tile)
    out["zero"] = _interleave(_row_words(nw.zero, zero_words(groups, nw.storage_bits)), tile)
    return out


def nibble_lane_words(parts: np.ndarray, width: int, group_size: int) -> np.ndarray:
    """``width``-bit codes uint8 ``[N, K]`` -> uint32 ``[N, K*width/32]`` in nibble-lane order.

    Per group, code ``i`` belongs to *nibble word* ``a = 4*(i//32) + i%4``, lane ``l = (i%32)//4``
    (8 codes per nibble word, one per 4-bit lane). With ``P = 4 // width`` nibble words per
    segment word, its part sits in word ``a // P`` at bit ``4*l + width*(a % P)``. So
    ``(word >> width*(a % P)) & (mask * 0x11111111)`` holds the parts of nibble word ``a``, one
    per lane, ready to be shifted to their bit position in the lane and or-ed with the other
    segments' (:mod:`moec.lower.kernels.nested_gemv`); the narrowest segment's words are also
    read as they are, each code multiplied where it sits. ``width`` must divide 4 and
    ``group_size`` be a multiple of 32.
    """
    if 4 % width or group_size % 32:
        raise MoecError(f"nibble-lane words need a width dividing 4 ({width}) and group_size % 32 == 0")
    n, k = parts.shape
    per = 4 // width
    # i = 32*W + 4*l + r, r = rq*per + rp: segment word W*width + rq, bit 4*l + width*rp.
    p = parts.astype(np.uint32).reshape(n, k // 32, 8, width, per)  # [.., W, l, rq, rp]
    shift = (4 * np.arange(8)[:, None, None] + width * np.arange(per)[None, None, :]).astype(np.uint32)
    words = np.bitwise_or.reduce((p << shift).transpose(0, 1, 3, 2, 4).reshape(n, k // 32, width, 8 * per), axis=-1)
    return words.reshape(n, k * width // 32).astype(np.uint32)
