"""Target-neutral TIR expressions that extract b-bit codes from kernel-layout uint32 words."""

from __future__ import annotations

from tvm import tirx


def _u32(value: int) -> tirx.PrimExpr:
    return tirx.const(value, "uint32")


def extract(load, word: tirx.PrimExpr, shift: tirx.PrimExpr, bits: int,
            straddle: tirx.PrimExpr | bool = False) -> tirx.PrimExpr:
    """The ``bits``-bit code at bit ``shift`` of word ``word`` (uint32), as a uint32 expression.

    Parameters
    ----------
    load : Callable[[PrimExpr], PrimExpr]
        Maps a word index to the uint32 load of that word (other indices already bound).
    word, shift : PrimExpr
        Word index and bit offset (``(i*b)//32`` and ``(i*b)%32`` for value ``i``).
    bits : int
        Code width.
    straddle : PrimExpr | bool
        Condition under which the code continues into word ``word + 1`` (only when ``bits`` does
        not divide 32). Constant after the decode loop is unrolled, so the branch folds away.
    """
    mask = _u32((1 << bits) - 1)
    lo = load(word) >> shift.astype("uint32")
    if straddle is False or 32 % bits == 0:
        return lo & mask
    # (w1 << 1) << (31 - s) is w1 << (32 - s) without an undefined shift by 32 when s == 0.
    hi = (load(word + 1) << _u32(1)) << (_u32(31) - shift.astype("uint32"))
    return tirx.if_then_else(straddle, (lo | hi) & mask, lo & mask)


def code_at(load, index: tirx.PrimExpr, bits: int) -> tirx.PrimExpr:
    """Code number ``index`` of a row's LSB-first stream held as uint32 words (see ``layout``)."""
    bit = index * bits
    shift = bit % 32
    return extract(load, bit // 32, shift, bits, straddle=shift > 32 - bits)
