"""Range-based quantization methods: round-to-nearest ("rtn") and per-group clipping search ("mse")."""

from __future__ import annotations

import numpy as np

from moec.quant.affine import affine_params, group_range, group_sq_error

#: Shrink factors tried by :func:`mse_params`; the first (1.0) is plain RTN.
MSE_SHRINKS: tuple[float, ...] = tuple(float(s) for s in np.linspace(1.0, 0.5, 20))

#: Largest group :func:`mse_params` searches with the compiled kernel (numpy's pairwise block).
MSE_KERNEL_MAX_GROUP = 128


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


def kernel_searches(group_size: int, shrinks: tuple[float, ...] = MSE_SHRINKS) -> bool:
    """Whether :func:`mse_params` runs as the compiled kernel of :mod:`moec.quant.mse_kernel`.

    It does for group sizes up to 128 (numpy's pairwise-summation block, whose order the kernel
    reproduces) and shrink factors in ``[2**-10, 1]``; otherwise the numpy loop below runs. Both
    give the same bits (``tests/quant/test_mse_kernel.py``).
    """
    return 1 <= group_size <= MSE_KERNEL_MAX_GROUP and all(2.0 ** -10 <= p <= 1.0 for p in shrinks)


def mse_params(wg: np.ndarray, bits: int, importance: np.ndarray | None = None,
               shrinks: tuple[float, ...] = MSE_SHRINKS) -> tuple[np.ndarray, np.ndarray]:
    """Per-group clipping search minimising the (importance-weighted) squared error.

    Each shrink factor ``p`` quantizes with the range ``[p * lo, p * hi]`` (both ends shrunk);
    each group keeps the factor with the smallest error, ties going to the earlier factor. As the
    first factor is 1.0 (exactly RTN), no group ends up worse than RTN. Where
    :func:`kernel_searches` holds, a compiled kernel does the same float32 arithmetic group by
    group (several times less CPU than the numpy loop, identical bits; it releases the GIL, so
    :func:`moec.quant.blocks.by_row_blocks` runs it on several threads as it did the loop).

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
    if kernel_searches(wg.shape[-1], shrinks):
        from moec.quant import mse_kernel  # loads TVM (seconds): only when a search runs
        return mse_kernel.mse_search(wg, bits, importance, shrinks)
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
