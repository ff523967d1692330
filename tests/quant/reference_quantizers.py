"""The quantizers as first written (moec 9301a9b): plain whole-matrix numpy, the reference the fast ones must equal.

``mse`` and ``hqq`` parameters and GPTQ's Hessian factor were rewritten for speed (blocked, fused,
threaded; torch's LAPACK). These copies of the original code are what the rewrites are tested against.
"""

from __future__ import annotations

import numpy as np

from moec.quant.affine import affine_dequantize, affine_params, affine_quantize, ceil_fp16, group_range, max_level
from moec.quant.hqq import shrink_lp
from moec.quant.methods import MSE_SHRINKS


def group_sq_error(wg, scale, zero, bits, importance=None):
    deq = affine_dequantize(affine_quantize(wg, scale, zero, bits), scale, zero)
    d2 = np.square(wg - deq)
    if importance is not None:
        d2 *= importance
    return d2.sum(axis=-1)


def mse_params(wg, bits, importance=None, shrinks=MSE_SHRINKS):
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


def _weighted_mean(x, imp, denom):
    if imp is not None:
        x = x * imp
    return x.sum(axis=-1) / denom


def hqq_params(wg, bits, importance=None, iters=8, p=0.7, beta=1.0, kappa=1.05):
    maxq = max_level(bits)
    imp = importance
    denom = (np.broadcast_to(imp, wg.shape).sum(axis=-1) if imp is not None else np.float32(wg.shape[-1]))
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
        scale = ceil_fp16(np.minimum(a, np.float32(60000.0)))
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


def hessian_inverse_factor(hessian, damp=0.01):
    h = np.array(hessian, dtype=np.float64)
    h = 0.5 * (h + h.T)
    k = h.shape[0]
    diag = np.arange(k)
    dead = h[diag, diag] <= 0
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h[dead, dead] = 1.0
    lam = damp * float(np.mean(h[diag, diag]))
    hd = h.copy()
    hd[diag, diag] += lam
    low = np.linalg.cholesky(hd)
    low_inv = np.linalg.inv(low)
    return np.linalg.cholesky(low_inv.T @ low_inv).T
