"""How the CUDA decode GEMVs see a stack's codes: segments, their bit positions, the widths served, and the
bit tricks that gather codes from bytes and bit planes (shared by the float32 and int8 bodies)."""

from __future__ import annotations

from dataclasses import dataclass

from tvm import tirx
from tvm.script import tirx as T

from moec.core.errors import MoecError
from moec.core.formats import get_nested_format
from moec.quant.nested import segment_positions, segments_for

LANES = 32  # a warp


@dataclass(frozen=True)
class Codes:
    """How a stack stores its codes: segment widths (most significant first), each segment's bit position
    in the stored code, the widths served (width ``i`` reads the first ``used[i]`` segments), storage bits."""

    segb: tuple[int, ...]
    positions: tuple[int, ...]
    widths: tuple[int, ...]
    used: tuple[int, ...]
    storage: int


def nested_codes(storage_bits: int) -> Codes:
    fmt = get_nested_format(storage_bits)
    return Codes(tuple(fmt.segment_bits), tuple(segment_positions(fmt)), tuple(fmt.derived_bits),
                  tuple(segments_for(fmt, w) for w in fmt.derived_bits), storage_bits)


def fixed_codes(bits: int) -> Codes:
    if bits not in (2, 3, 4, 8):
        raise MoecError(f"the CUDA expert GEMV takes 2, 3, 4 or 8-bit stacks, not {bits}")
    return Codes((bits,), (0,), (bits,), (1,), bits)


def code_bits(buf, bit: int | tirx.PrimExpr, bits: int, last: int):
    """``bits`` bits at ``bit`` of the LSB-first byte stream ``buf(0 …)`` (a second byte where a code may
    straddle one; ``last`` is the stream's last byte index)."""
    lo = T.Cast("uint32", buf(bit // 8))
    if 8 % bits:
        lo = lo | (T.Cast("uint32", buf(T.min(bit // 8 + 1, last))) << T.uint32(8))
    return (lo >> T.Cast("uint32", bit % 8)) & T.uint32((1 << bits) - 1)


def spread(word, bits: int, shift: int):
    """(even, odd) words of a run chunk's eight ``bits``-bit values ``word`` (LSB first): value ``v`` in byte
    ``v // 2`` of the even (``v`` even) or odd word, moved up by ``shift`` bits. A 1-bit plane's four even
    bits go to their bytes by one multiply (``bit 2i → 8i``: partial products land two to a position at
    most, on even positions, so their carries stop on the odd bit above)."""
    if bits == 1:
        lo = (((word & T.uint32(0x55)) * T.uint32(0x41041)) & T.uint32(0x01010101))
        hi = ((((word >> T.uint32(1)) & T.uint32(0x55)) * T.uint32(0x41041)) & T.uint32(0x01010101))
    elif bits == 2:  # nibbles to bytes, then the nibble's two values
        x = (word | (word << T.uint32(8))) & T.uint32(0x00FF00FF)
        x = (x | (x << T.uint32(4))) & T.uint32(0x0F0F0F0F)
        lo, hi = x & T.uint32(0x03030303), (x >> T.uint32(2)) & T.uint32(0x03030303)
    elif bits == 4:
        lo, hi = word & T.uint32(0x0F0F0F0F), (word >> T.uint32(4)) & T.uint32(0x0F0F0F0F)
    else:
        raise MoecError(f"no word assembly for {bits}-bit segments")
    if shift:
        lo, hi = lo << T.uint32(shift), hi << T.uint32(shift)
    return lo, hi


def row_outputs(R: int, H: int):
    """``(result, store)`` of a warp's ``R`` output rows: ``result(acc, r)`` row ``r``'s output from its summed
    accumulators (``acc[r]``; with ``H = 2`` stacks ``silu(acc[r]) · acc[R + r]``, gate times up);
    ``store(acc, y, j, row0, lane)`` sums the ``H · R`` accumulators over the warp's lanes by shuffles and
    lane 0 writes rows ``row0 …`` of ``y[j]``."""
    def result(acc, r):
        if H == 1:
            return acc[r]
        return acc[r] / (T.float32(1) + T.exp(-acc[r])) * acc[R + r]

    @T.macro
    def store(acc, y, j, row0, lane):
        for r in T.unroll(H * R):
            for o in T.unroll(5):
                acc[r] = acc[r] + T.tvm_warp_shuffle_down(T.tvm_warp_activemask(), acc[r], 16 >> o, LANES, LANES)
        if lane == 0:
            for r in T.unroll(R):
                y[j, row0 + r] = result(acc, r)

    return result, store
