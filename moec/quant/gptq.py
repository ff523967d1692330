"""GPTQ (Frantar et al. 2022): Hessian-aware column-sequential quantization into moec's group-wise format.

GPTQ quantizes ``w [N, K]`` one input column at a time, left to right, and spreads each
column's rounding error over the not-yet-quantized columns through the upper Cholesky factor
of ``H^-1``, where ``H = E[x x^T]`` over the calibration inputs ``x [K]`` of the weight. This
minimises the *output* error ``||X W^T - X Q^T||`` rather than the weight error, which is what
the range-based methods ("rtn", "mse", "hqq") minimise.

The result is exactly moec's format (:class:`~moec.quant.quantize.QuantizedTensor`: uint8
codes, float16 scales rounded up, uint8 integer zero points, ``deq = (q - zero) * scale``), so
:func:`~moec.quant.quantize.dequantize`, packing and every back end work unchanged. Each
group's ``(scale, zero)`` is computed when the sweep reaches the group's first column, from the
*current* (error-updated) weights of the group, with the same rules as
:func:`~moec.quant.methods.rtn_params` (or, with ``group_method="mse"``, a clipping search on
them weighted by ``diag(H)``).

``act_order`` (quantizing columns by decreasing ``diag(H)``) is not supported: moec's groups
are runs of consecutive input columns whose parameters must be known when their first column
is quantized, and a permuted order would visit a group's columns at scattered times.
"""

from __future__ import annotations

import numpy as np
import torch

from moec.core.errors import MoecError
from moec.quant.affine import max_level
from moec.quant.methods import mse_params, rtn_params
from moec.quant.quantize import QuantizedTensor, _as_weight, check_bits, check_group_size

#: Columns per lazy block update (rounded to a multiple of the group size).
BLOCK_SIZE = 128

#: How the per-group ``(scale, zero)`` are chosen from the error-updated group weights.
GROUP_METHODS = ("rtn", "mse")


def hessian_inverse_factor(hessian: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """Upper Cholesky factor ``U`` (``H^-1 = U^T U``) of the dampened Hessian's inverse, float64.

    Dead columns (``H[j, j] == 0``: the input channel was always 0 in calibration) get
    ``H[j, j] = 1`` so the matrix stays invertible; their row and column of ``H`` are zero, so
    their rounding error is never propagated and they are quantized round-to-nearest. The
    diagonal is then dampened by ``damp * mean(diag(H))``. If the Cholesky factorisation still
    fails (a numerically indefinite ``H``), the dampening is multiplied by 10 up to 4 times.

    ``U`` is computed with one Cholesky factorisation and one triangular solve (torch's LAPACK,
    float64): with ``J`` the order-reversing permutation and ``J H J = L L^T``,
    ``H^-1 = (J L^-1 J)^T (J L^-1 J)`` and ``J L^-1 J`` is upper triangular with a positive
    diagonal, hence the Cholesky factor. It equals the textbook ``cholesky(inv(H)).T`` to
    float64 rounding at a fraction of the cost (no general inverse, no second factorisation).

    Parameters
    ----------
    hessian : np.ndarray
        Symmetric positive semi-definite ``[K, K]``, e.g. ``mean(x x^T)`` of the weight's inputs.
    damp : float
        Relative dampening (GPTQ's "percdamp").

    Returns
    -------
    np.ndarray
        float64 upper-triangular ``[K, K]``.
    """
    h = np.array(hessian, dtype=np.float64)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise MoecError(f"hessian must be square [K, K], got shape {h.shape}")
    if not np.isfinite(h).all():
        raise MoecError("hessian contains NaN or infinite values")
    if not damp >= 0:
        raise MoecError(f"damp must be >= 0, got {damp!r}")
    h = 0.5 * (h + h.T)
    k = h.shape[0]
    diag = np.arange(k)
    dead = h[diag, diag] <= 0
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h[dead, dead] = 1.0
    mean_diag = float(np.mean(h[diag, diag]))
    lam = damp * mean_diag
    flipped = torch.from_numpy(np.ascontiguousarray(h[::-1, ::-1]))
    eye = torch.eye(k, dtype=torch.float64)
    for _ in range(5):
        hd = flipped.clone()
        hd.diagonal().add_(lam)
        low, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            u = torch.linalg.solve_triangular(low, eye, upper=False).numpy()[::-1, ::-1]
            if np.isfinite(u).all():
                return np.ascontiguousarray(u)
        lam = max(lam * 10.0, 1e-8 * mean_diag, 1e-12)
    raise MoecError("hessian is not positive definite even after dampening; check the calibration "
                    "statistics")


_last_factor: tuple | None = None  # (hessian array, damp, factor) of the previous call


def _factor_of(hessian: np.ndarray, damp: float) -> np.ndarray:
    """``hessian_inverse_factor``, reused when called again with the same array object and damp.

    w1 and w3 of an expert see the same inputs and get the same Hessian object
    (``finish_hessians``); packing them one after the other factors it once. Hessians are never
    modified in place, so the identity of the array is its value.
    """
    global _last_factor
    last = _last_factor
    if last is not None and last[0] is hessian and last[1] == damp:
        return last[2]
    u = hessian_inverse_factor(hessian, damp)
    _last_factor = (hessian, damp, u)
    return u


def _group_params(wg: np.ndarray, bits: int, method: str,
                  importance: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """``(scale fp16 [N], zero uint8 [N])`` of one group ``wg [N, gs]`` (float64 in)."""
    g = wg.astype(np.float32)[:, None, :]
    if method == "rtn":
        scale, zero = rtn_params(g, bits)
    else:
        imp = None if importance is None else importance.astype(np.float32)[None, None, :]
        scale, zero = mse_params(g, bits, imp)
    return scale[:, 0], zero[:, 0]


def gptq_quantize(w: np.ndarray, bits: int, group_size: int, hessian: np.ndarray,
                  damp: float = 0.01, act_order: bool = False, group_method: str = "rtn",
                  static_groups: bool = False, block_size: int = BLOCK_SIZE) -> QuantizedTensor:
    """Quantize ``w [N, K]`` with GPTQ into moec's group-wise asymmetric format.

    Columns are processed left to right. At the first column of each group the group's
    ``(scale, zero)`` are computed from the current, error-updated weights of that group (or,
    with ``static_groups``, from the original weights, before any error feedback). Each column
    is then quantized ``q = clamp(round(w / scale) + zero, 0, 2**bits - 1)`` with the stored
    fp16 scale, and its error ``(w - deq) / U[j, j]`` is subtracted from the later columns
    times ``U[j, j+1:]``, ``U`` the upper Cholesky factor of the dampened ``H^-1``. Updates are
    applied lazily in blocks of ``block_size`` columns (a multiple of the group size, so a group
    never straddles blocks and its parameters always see every earlier column's feedback).
    Internally float64; vectorised over N.

    Parameters
    ----------
    w : np.ndarray
        Floating-point ``[N, K] = [out_features, in_features]`` weight.
    bits : int
        One of :data:`~moec.quant.quantize.SUPPORTED_BITS`.
    group_size : int
        Divisor of K, >= 8.
    hessian : np.ndarray
        ``[K, K]`` symmetric PSD second moment ``mean(x x^T)`` of the weight's inputs.
    damp : float
        Relative dampening: ``damp * mean(diag(H))`` is added to the diagonal.
    act_order : bool
        Not supported (see the module docstring); ``True`` raises :class:`MoecError`.
    group_method : str
        ``"rtn"`` (full min/max range of the updated group) or ``"mse"`` (clipping search on the
        updated group, each column weighted by ``diag(H)``).
    static_groups : bool
        Compute every group's parameters up front from the original weights.
    block_size : int
        Columns per lazy update block (rounded up to a multiple of ``group_size``).

    Returns
    -------
    QuantizedTensor

    Raises
    ------
    MoecError
        On ``act_order``, bad bits / group size / weight / Hessian shape, or an unknown
        ``group_method``.
    """
    if act_order:
        raise MoecError("gptq act_order is not supported: moec's groups are runs of consecutive "
                        "input columns whose scale and zero must stay in natural column order")
    check_bits(bits)
    if group_method not in GROUP_METHODS:
        raise MoecError(f"unknown gptq group_method {group_method!r}; choices: {', '.join(GROUP_METHODS)}")
    w32 = _as_weight(w)
    n, k = w32.shape
    check_group_size(group_size, k)
    bits, gs = int(bits), int(group_size)
    if np.shape(hessian) != (k, k):
        raise MoecError(f"hessian must be [K, K] = [{k}, {k}] for a weight of shape {w32.shape}, "
                        f"got {np.shape(hessian)}")
    u = _factor_of(hessian, damp)
    hdiag = np.clip(np.diag(np.asarray(hessian, dtype=np.float64)), 0, None)
    maxq = max_level(bits)
    groups = k // gs
    block = max(gs, -(-int(block_size) // gs) * gs)

    wk = w32.astype(np.float64)
    q = np.zeros((n, k), dtype=np.uint8)
    scale = np.zeros((n, groups), dtype=np.float16)
    zero = np.zeros((n, groups), dtype=np.uint8)
    if static_groups:
        for g in range(groups):
            sl = slice(g * gs, (g + 1) * gs)
            scale[:, g], zero[:, g] = _group_params(wk[:, sl], bits, group_method, hdiag[sl])

    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = wk[:, i1:i2].copy()
        err1 = np.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = col // gs
            if col % gs == 0 and not static_groups:
                scale[:, g], zero[:, g] = _group_params(w1[:, i:i + gs], bits, group_method,
                                                        hdiag[col:col + gs])
            s = scale[:, g].astype(np.float64)
            z = zero[:, g].astype(np.float64)
            qc = np.clip(np.round(w1[:, i] / s) + z, 0, maxq)
            q[:, col] = qc.astype(np.uint8)
            deq = (qc - z) * s
            e = (w1[:, i] - deq) / u1[i, i]
            w1[:, i + 1:] -= np.outer(e, u1[i, i + 1:])
            err1[:, i] = e
        if i2 < k:
            wk[:, i2:] -= err1 @ u[i1:i2, i2:]
    return QuantizedTensor(q=q, scale=scale, zero=zero, bits=bits, group_size=gs)
