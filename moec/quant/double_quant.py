"""Double-quantized group scales (scale format ``u8``): per-group uint8 scale codes against a float16
super-scale per super-block of groups, then the zero points and codes re-fitted to the stored scales.

Layout (``moec.core.formats.SCALE_FORMATS["u8"]``): for a weight with ``G`` groups per row and
``sg = super_groups`` groups per super-block, ``codes`` uint8 ``[N, G]`` (1…255) and ``super_scale``
float16 ``[N, ceil(G / sg)]``; group ``g``'s scale is ``codes[n, g] · super_scale[n, g // sg]`` in
float32, exact (an 8-bit integer times a float16 has at most 19 significant bits).

Quantizing (:func:`double_quantize_params`): the method's float16 scales and zeros first; then per
super-block ``S = ceil_fp16(max scale / 255)`` (rounded up, so no code exceeds 255) and
``c = clamp(round(scale / S), 1, 255)``; then each group's code and zero are re-fitted to what is
stored: of the codes ``c − 1, c, c + 1`` and the zeros around ``round(zero · scale / (c · S))`` (±1),
the pair with the smallest (importance-weighted) squared error of the group; the weight codes are
finally rounded against the stored ``c · S`` and zero, so dequantizing reproduces exactly what the
search scored.
"""

from __future__ import annotations

import numpy as np

from moec.core.formats import get_scale_format
from moec.quant.affine import ceil_fp16, group_sq_error, max_level

#: Largest scale code (uint8).
MAX_CODE = 255
#: float32 elements of a row block of the re-fit (bounds its scratch memory).
_BLOCK_ELEMS = 1 << 18


def super_blocks(groups: int, super_groups: int) -> int:
    """Super-scales per row: ``ceil(groups / super_groups)``."""
    return -(-groups // super_groups)


def group_scales(codes: np.ndarray, super_scale: np.ndarray, super_groups: int) -> np.ndarray:
    """float32 ``[N, G]`` scales ``codes · super_scale`` of double-quantized scales (exact in float32)."""
    groups = codes.shape[-1]
    sup = np.repeat(super_scale.astype(np.float32), super_groups, axis=-1)[..., :groups]
    return codes.astype(np.float32) * sup


def split_scales(scale: np.ndarray, super_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Positive float scales ``[N, G]`` -> ``(codes uint8 [N, G], super_scale float16 [N, B])``."""
    s = np.asarray(scale, dtype=np.float32)
    n, groups = s.shape
    blocks = super_blocks(groups, super_groups)
    padded = np.zeros((n, blocks * super_groups), np.float32)
    padded[:, :groups] = s
    smax = padded.reshape(n, blocks, super_groups).max(axis=-1)
    sup = ceil_fp16(np.maximum(smax / np.float32(MAX_CODE), np.float32(np.finfo(np.float16).tiny)))
    per_group = np.repeat(sup.astype(np.float32), super_groups, axis=1)[:, :groups]
    codes = np.clip(np.rint(s / per_group), 1, MAX_CODE).astype(np.uint8)
    return codes, sup


def _refit(wg: np.ndarray, scale: np.ndarray, zero: np.ndarray, codes: np.ndarray, sup: np.ndarray,
           bits: int, importance: np.ndarray | None, super_groups: int) -> tuple[np.ndarray, np.ndarray]:
    maxq = max_level(bits)
    per_group = np.repeat(sup.astype(np.float32), super_groups, axis=1)[:, :codes.shape[1]]
    lo_scaled = zero.astype(np.float32) * scale.astype(np.float32)  # the method's -lo (its zero · scale)
    best_c = best_z = best_err = None
    for dc in (0, -1, 1):
        c = np.clip(codes.astype(np.int32) + dc, 1, MAX_CODE)
        s = c.astype(np.float32) * per_group
        centre = np.rint(lo_scaled / s)
        for dz in (0, -1, 1):
            z = np.clip(centre + dz, 0, maxq).astype(np.uint8)
            err = group_sq_error(wg, s, z, bits, importance)
            if best_err is None:
                best_c, best_z, best_err = c, z, err
                continue
            better = err < best_err
            best_c = np.where(better, c, best_c)
            best_z = np.where(better, z, best_z)
            best_err = np.where(better, err, best_err)
    return best_c.astype(np.uint8), best_z.astype(np.uint8)


def double_quantize_params(wg: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int,
                           importance: np.ndarray | None, scales: str
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize a method's ``(scale fp16 [N, G], zero uint8 [N, G])`` of ``wg [N, G, gs]`` to scale
    format ``scales`` and re-fit (module docstring): ``(codes uint8 [N, G], super_scale fp16 [N, B],
    zero uint8 [N, G])``."""
    sg = get_scale_format(scales).super_groups
    codes, sup = split_scales(scale, sg)
    n = wg.shape[0]
    step = max(1, _BLOCK_ELEMS // max(1, wg.shape[1] * wg.shape[2]))
    out_c = np.empty_like(codes)
    out_z = np.empty_like(zero)
    for r0 in range(0, n, step):
        r = slice(r0, r0 + step)
        out_c[r], out_z[r] = _refit(wg[r], scale[r], zero[r], codes[r], sup[r], bits, importance, sg)
    return out_c, sup, out_z
