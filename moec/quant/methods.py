"""Range-based quantization methods: round-to-nearest ("rtn") and per-group clipping search ("mse")."""

from __future__ import annotations

import numpy as np

from moec.quant.affine import affine_params, group_range, group_sq_error

#: Shrink factors tried by :func:`mse_params`; the first (1.0) is plain RTN.
MSE_SHRINKS: tuple[float, ...] = tuple(float(s) for s in np.linspace(1.0, 0.5, 20))


def rtn_params(wg: np.ndarray, bits: int,
               importance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Round-to-nearest: scale and zero from each group's full ``[min, max]`` range.

    Parameters
    ----------
    wg : np.ndarray
        float32 ``[N, G, group_size]`` grouped weights.
    bits : int
        Bit width.
    importance : np.ndarray | None
        Ignored (RTN does not minimise an error); accepted for a uniform method signature.

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        ``scale`` float16 ``[N, G]`` and ``zero`` uint8 ``[N, G]``.
    """
    lo, hi = group_range(wg)
    return affine_params(lo, hi, bits)


def mse_params(wg: np.ndarray, bits: int, importance: np.ndarray | None = None,
               shrinks: tuple[float, ...] = MSE_SHRINKS) -> tuple[np.ndarray, np.ndarray]:
    """Per-group clipping search minimising the (importance-weighted) squared error.

    Each shrink factor ``p`` quantizes with the range ``[p * lo, p * hi]`` (both ends shrunk);
    each group keeps the factor with the smallest error, ties going to the earlier factor. As the
    first factor is 1.0 (exactly RTN), no group ends up worse than RTN.

    Parameters
    ----------
    wg : np.ndarray
        float32 ``[N, G, group_size]`` grouped weights.
    bits : int
        Bit width.
    importance : np.ndarray | None
        Non-negative per-element weights broadcastable to ``wg`` (``[1, G, group_size]``, e.g. the
        mean squared activation of each input channel), or ``None`` for plain squared error.
    shrinks : tuple[float, ...]
        Shrink factors to try, in order of preference on ties.

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        ``scale`` float16 ``[N, G]`` and ``zero`` uint8 ``[N, G]``.
    """
    lo, hi = group_range(wg)
    best_scale = best_zero = best_err = None
    for p in shrinks:
        p32 = np.float32(p)
        scale, zero = affine_params(lo * p32, hi * p32, bits)
        err = group_sq_error(wg, scale, zero, bits, importance)
        if best_err is None:
            best_scale, best_zero, best_err = scale, zero, err
            continue
        better = err < best_err
        best_scale = np.where(better, scale, best_scale)
        best_zero = np.where(better, zero, best_zero)
        best_err = np.where(better, err, best_err)
    return best_scale, best_zero
