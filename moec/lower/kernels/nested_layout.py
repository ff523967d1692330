"""Where a code's part of a nested bit-plane segment sits in the kernel layout's nibble-lane words.

One rule, used by every kernel that reads nested segments (``nested_grouped``; the numpy side is
:func:`moec.lower.kernels.layout.nibble_lane_words`, which writes the words): per quantization group,
code ``i`` belongs to nibble word ``a = 4·(i//32) + i%4``, lane ``l = (i%32)//4``; a ``w``-bit
segment word holds ``P = 4 // w`` nibble words' parts, so the part of code ``i`` is in the group's
segment word ``a // P`` at bit ``4·l + w·(a % P)``. The arguments may be Python ints or TIR
expressions (``//`` and ``%`` are floor division and modulo in both).
"""

from __future__ import annotations


def segment_part(i, width: int):
    """(word within the group's ``width``-bit segment words, bit in that word) of code ``i``'s part."""
    per = 4 // width
    r = i % 4
    return (i // 32) * width + r // per, 4 * ((i % 32) // 4) + width * (r % per)
