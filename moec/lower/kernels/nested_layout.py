"""Where a code's part of a nested bit-plane segment sits in the kernel layout's nibble-lane words.

One rule, for kernels that read nested segments (``nested_grouped``; the numpy side is
:func:`moec.lower.kernels.layout.nibble_lane_words`, which writes the words): per quantization group,
code ``i`` belongs to *nibble word* ``a = 4·(i//32) + i%4``, lane ``l = (i%32)//4`` (8 codes a nibble
word, one per 4-bit lane). A ``w``-bit segment word holds ``P = 4 // w`` nibble words' parts: nibble
word ``a``'s parts are in the group's segment word ``a // P``, shifted by ``w·(a % P)``, one per lane
(so ``(word >> w·(a % P)) & (mask · 0x11111111)`` holds them all, each at the bottom of its lane).
The arguments may be Python ints or TIR expressions (``//`` and ``%`` floor in both).
"""

from __future__ import annotations


def nibble_of(i):
    """(nibble word, lane) of code ``i`` of a group."""
    return 4 * (i // 32) + i % 4, (i % 32) // 4


def nibble_word(a, width: int):
    """(word within the group's ``width``-bit segment words, right shift) holding nibble word ``a``'s parts."""
    per = 4 // width
    return a // per, width * (a % per)


def segment_part(i, width: int):
    """(word within the group's ``width``-bit segment words, bit in that word) of code ``i``'s part."""
    a, lane = nibble_of(i)
    word, shift = nibble_word(a, width)
    return word, 4 * lane + shift
