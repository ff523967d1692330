"""The CUDA int8 nested GEMV's layout of bit-plane segments: each lane run's bits already at their code bytes.

A nested stack's segment ``s`` of ``b`` bits (1, 2 or 4) stores, per row, the ``b``-bit parts of the row's
codes LSB-first (``moec.quant.nested``). The CUDA int8 GEMV reads a row in runs of :data:`RUN` = 32 codes
(one lane step) and hands ``dp4a`` eight words of four code bytes, word ``i`` holding codes ``4 i .. 4 i + 3``
of the run. In this layout each run's ``b`` bits a code are ``b`` 32-bit words (the same bytes a row as
before, in the same run) arranged so that word ``i``'s four parts come out of one word by one shift and
one mask::

    code 4 i + m of the run  →  word i // (8 / b),  bits [8 m + b · (i mod 8 / b), … + b)

so a width's code word is ``Σ_s ((W_s >> f_s) << p_s) & mask_s`` over the segments it reads (two
instructions a segment, the or folded into the mask), where ``f_s`` is the part's offset in its byte and
``p_s`` the segment's bit position in the width's code (``cuda_gemv_int8``). A fixed stack's 3-bit codes
(``bits = 3``), which straddle bytes in moec's layout, take the same form as two parts: each run's high two
bits as a 2-bit segment's two words, then its low bits as a 1-bit segment's word (12 bytes a run, as before).
Scales and zero points are unchanged. :func:`to_run_layout` and :func:`from_run_layout` are exact inverses.
"""

from __future__ import annotations

import numpy as np

from moec.core.errors import MoecError
from moec.quant.pack import pack, unpack

RUN = 32  # codes a lane step


def _check(bits: int, k: int) -> None:
    if bits not in (1, 2, 3, 4) or k % RUN:
        raise MoecError(f"the CUDA run layout takes 1-, 2- or 4-bit segments or 3-bit codes of rows of a multiple "
                        f"of {RUN} codes, not {bits} bits and {k}")


def _slots(bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(word, bit) of each code of a run."""
    per = 8 // bits  # parts a byte
    i, m = np.arange(RUN) // 4, np.arange(RUN) % 4
    return i // per, 8 * m + bits * (i % per)


def _words(parts: np.ndarray, bits: int) -> np.ndarray:
    """``[..., RUN]`` parts of ``bits`` (1, 2 or 4) bits to their ``bits`` words a run."""
    word, bit = _slots(bits)
    words = np.zeros((*parts.shape[:-1], bits), np.uint32)
    for c in range(RUN):
        words[..., word[c]] |= parts[..., c] << np.uint32(bit[c])
    return words


def _parts(words: np.ndarray, bits: int) -> np.ndarray:
    word, bit = _slots(bits)
    return np.stack([(words[..., word[c]] >> np.uint32(bit[c])) & np.uint32((1 << bits) - 1) for c in range(RUN)],
                    axis=-1)


def to_run_layout(segment: np.ndarray, bits: int, k: int) -> np.ndarray:
    """A segment ``[..., N, K·b/8]`` (uint8, LSB-first parts) in the run layout (same shape and dtype)."""
    _check(bits, k)
    rows = np.ascontiguousarray(segment).reshape(-1, segment.shape[-1])
    parts = unpack(rows, bits, k).astype(np.uint32).reshape(*segment.shape[:-1], k // RUN, RUN)
    if bits == 3:  # the high two bits' words, then the low bits' word
        words = np.concatenate([_words(parts >> np.uint32(1), 2), _words(parts & np.uint32(1), 1)], axis=-1)
    else:
        words = _words(parts, bits)
    return np.ascontiguousarray(words.astype("<u4")).view(np.uint8).reshape(segment.shape)


def from_run_layout(segment: np.ndarray, bits: int, k: int) -> np.ndarray:
    """The LSB-first segment of a run-layout one (the inverse of :func:`to_run_layout`)."""
    _check(bits, k)
    words = np.ascontiguousarray(segment).view("<u4").reshape(*segment.shape[:-1], k // RUN, bits)
    if bits == 3:
        parts = (_parts(words[..., :2], 2) << np.uint32(1)) | _parts(words[..., 2:], 1)
    else:
        parts = _parts(words, bits)
    return pack(parts.reshape(-1, k).astype(np.uint8), bits).reshape(segment.shape)
