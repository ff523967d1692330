"""Group-wise asymmetric (affine) quantization primitives shared by every quantization method."""

from __future__ import annotations

import numpy as np

from moec.core.errors import MoecError

_FP16_MAX = float(np.finfo(np.float16).max)


def max_level(bits: int) -> int:
    """Largest quantized level, ``2**bits - 1``."""
    return (1 << bits) - 1


def group_view(w: np.ndarray, group_size: int) -> np.ndarray:
    """View a float32 ``[N, K]`` matrix as ``[N, K // group_size, group_size]`` (groups run along K)."""
    n, k = w.shape
    return w.reshape(n, k // group_size, group_size)


def group_range(wg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-group ``(lo, hi)`` of ``wg [N, G, gs]``, extended to include 0.

    Including 0 (as GPTQ and onnxruntime's quantizer do) keeps the integer zero point
    ``round(-lo / scale)`` inside ``[0, 2**bits - 1]``, so clamping it never distorts the grid,
    and a weight of exactly 0 is always reproduced exactly.
    """
    lo = np.minimum(wg.min(axis=-1), np.float32(0))
    hi = np.maximum(wg.max(axis=-1), np.float32(0))
    return lo, hi


def ceil_fp16(x: np.ndarray) -> np.ndarray:
    """Smallest float16 >= each (positive, float32) element of ``x``.

    Rounding the scale *up* guarantees ``scale * (2**bits - 1) >= hi - lo``, so round-to-nearest
    never clips a group's own range; and a positive scale never underflows to 0.

    Raises
    ------
    MoecError
        If a value exceeds the float16 range (weights far too large for fp16 scales).
    """
    x = np.asarray(x, dtype=np.float32)
    if x.size and float(x.max()) > _FP16_MAX:
        raise MoecError(f"quantization scale {float(x.max()):.4g} exceeds the float16 range "
                        f"({_FP16_MAX:g}); the weights are too large to quantize with fp16 scales")
    s16 = x.astype(np.float16)
    low = s16.astype(np.float32) < x
    if low.any():
        s16[low] = np.nextafter(s16[low], np.float16(np.inf))
    return s16


def affine_params(lo: np.ndarray, hi: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Stored ``(scale fp16, zero uint8)`` for per-group ranges ``lo <= 0 <= hi`` (float32).

    ``scale = ceil_fp16((hi - lo) / (2**bits - 1))`` computed in float32; a zero-width range
    (an all-zero group) gets scale 1.0. ``zero = clamp(round(-lo / scale), 0, 2**bits - 1)``
    uses the stored fp16 scale, so dequantization sees exactly the values used here.
    """
    maxq = max_level(bits)
    scale32 = (hi - lo) / np.float32(maxq)
    scale32 = np.where(scale32 > 0, scale32, np.float32(1.0)).astype(np.float32)
    scale = ceil_fp16(scale32)
    zero = np.clip(np.round(-lo / scale.astype(np.float32)), 0, maxq).astype(np.uint8)
    return scale, zero


def affine_quantize(wg: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    """``q = clamp(round(w / scale) + zero, 0, 2**bits - 1)`` for ``wg [N, G, gs]`` -> uint8 ``[N, G, gs]``.

    Arithmetic is float32; ``round`` is numpy's round-half-to-even.
    """
    s = scale.astype(np.float32)[..., None]
    z = zero.astype(np.float32)[..., None]
    q = np.round(wg / s) + z
    return np.clip(q, 0, max_level(bits)).astype(np.uint8)


def affine_dequantize(q: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """``(q - zero) * scale`` in float32 for ``q [N, G, gs]`` -> float32 ``[N, G, gs]``.

    The product of a small integer and an fp16 value is exact in float32, so any back end that
    dequantizes in float32 reproduces these values bit for bit.
    """
    qz = q.astype(np.float32) - zero.astype(np.float32)[..., None]
    return qz * scale.astype(np.float32)[..., None]


def group_sq_error(wg: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int,
                   importance: np.ndarray | None = None) -> np.ndarray:
    """Per-group (importance-weighted) squared reconstruction error, float32 ``[N, G]``.

    ``importance`` is ``None`` or broadcastable to ``wg`` (``[1, G, gs]``). The same float32
    operations as :func:`affine_quantize` followed by :func:`affine_dequantize` (the codes are
    whole numbers in ``[0, 2**bits - 1]``, so keeping them in float32 instead of uint8 changes
    no value), computed in one scratch buffer: the search methods call this once per candidate.
    """
    s = scale.astype(np.float32)[..., None]
    z = zero.astype(np.float32)[..., None]
    t = np.divide(wg, s)
    np.rint(t, out=t)  # np.round's half-to-even
    # clamp(r + z, 0, maxq) - z == clamp(r, -z, maxq - z): every operand is a small whole number
    np.clip(t, -z, np.float32(max_level(bits)) - z, out=t)
    t *= s
    np.subtract(wg, t, out=t)
    np.square(t, out=t)
    if importance is not None:
        t *= importance
    return t.sum(axis=-1)
