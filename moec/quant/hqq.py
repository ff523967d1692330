"""HQQ-style refinement ("hqq"): half-quadratic alternating optimisation of scale and zero point."""

from __future__ import annotations

import numpy as np

from moec.quant.affine import affine_dequantize, affine_quantize, ceil_fp16, group_sq_error, max_level
from moec.quant.methods import mse_params

_FP16_SAFE = np.float32(60000.0)


def shrink_lp(x: np.ndarray, beta: float, p: float) -> np.ndarray:
    """Proximal operator of ``|x|**p`` (``p < 1``): ``sign(x) * relu(|x| - |x|**(p - 1) / beta)``."""
    ax = np.abs(x)
    # The floor keeps |x|**(p-1) finite at x == 0, where the result is 0 either way.
    mag = ax - np.power(np.maximum(ax, np.float32(1e-30)), np.float32(p - 1)) / np.float32(beta)
    return np.sign(x) * np.maximum(mag, np.float32(0))


def _weighted_mean(x: np.ndarray, imp: np.ndarray | None, denom: np.ndarray) -> np.ndarray:
    if imp is not None:
        x = x * imp
    return x.sum(axis=-1) / denom


def hqq_params(wg: np.ndarray, bits: int, importance: np.ndarray | None = None, iters: int = 8,
               p: float = 0.7, beta: float = 1.0, kappa: float = 1.05) -> tuple[np.ndarray, np.ndarray]:
    """Refine the "mse" solution by half-quadratic alternating optimisation (after HQQ, Badri & Shaji 2023).

    Each iteration: quantize with the current ``(scale, zero)``; split off the sparse outlier part
    ``e`` of the residual with the ``l_p`` (``p < 1``) proximal operator, measured in quantization
    steps; refit the scale to ``w - e`` by (importance-weighted) least squares and the zero point
    as the rounded weighted mean of ``q - (w - e) / scale``, projecting onto fp16 scales and
    integer zero points. ``beta`` grows by ``kappa`` each iteration. Each group keeps the
    iterate with the smallest (importance-weighted) squared error, starting from the "mse"
    solution, so the result is never worse than "mse" (and hence than "rtn").

    Parameters
    ----------
    wg : np.ndarray
        float32 ``[N, G, group_size]`` grouped weights.
    bits : int
        Bit width.
    importance : np.ndarray | None
        Non-negative weights broadcastable to ``wg`` (``[1, G, group_size]``), or ``None``.
    iters : int
        Number of refinement iterations.
    p, beta, kappa : float
        ``l_p`` exponent, initial half-quadratic penalty, and its growth factor per iteration.

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        ``scale`` float16 ``[N, G]`` and ``zero`` uint8 ``[N, G]``.
    """
    maxq = max_level(bits)
    imp = importance
    denom = (np.broadcast_to(imp, wg.shape).sum(axis=-1) if imp is not None
             else np.float32(wg.shape[-1]))
    denom = np.maximum(denom, np.float32(1e-30))
    scale, zero = mse_params(wg, bits, imp)
    best_scale, best_zero = scale, zero
    best_err = group_sq_error(wg, scale, zero, bits, imp)
    for _ in range(iters):
        s = scale.astype(np.float32)
        q = affine_quantize(wg, scale, zero, bits)
        deq = affine_dequantize(q, scale, zero)
        e = shrink_lp((wg - deq) / s[..., None], beta, p) * s[..., None]
        t = wg - e
        qf = q.astype(np.float32)
        mq = _weighted_mean(qf, imp, denom)
        mt = _weighted_mean(t, imp, denom)
        dq = qf - mq[..., None]
        var = _weighted_mean(dq * dq, imp, denom)
        cov = _weighted_mean(dq * (t - mt[..., None]), imp, denom)
        ok = (var > 0) & (cov > 0)
        a = np.where(ok, cov / np.where(ok, var, np.float32(1)), s)
        # An absurd slope only loses to the error guard below; keep it inside fp16 meanwhile.
        scale = ceil_fp16(np.minimum(a, _FP16_SAFE))
        s = scale.astype(np.float32)
        z = _weighted_mean(qf - t / s[..., None], imp, denom)
        zero = np.clip(np.round(z), 0, maxq).astype(np.uint8)
        err = group_sq_error(wg, scale, zero, bits, imp)
        better = err < best_err
        best_scale = np.where(better, scale, best_scale)
        best_zero = np.where(better, zero, best_zero)
        best_err = np.where(better, err, best_err)
        beta *= kappa
    return best_scale, best_zero
