"""Group-wise asymmetric weight quantization: the QuantizedTensor container, quantize and dequantize."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from moec.core.errors import MoecError
from moec.core.formats import DEFAULT_SCALES, QUANT_BITS, get_scale_format
from moec.quant.affine import affine_dequantize, affine_quantize, group_view, max_level
from moec.quant.blocks import by_row_blocks
from moec.quant.double_quant import double_quantize_params, group_scales, super_blocks
from moec.quant.hqq import hqq_params
from moec.quant.methods import mse_params, rtn_params

#: Bit widths handled by :func:`quantize` (16 means "keep float" and is handled by callers).
SUPPORTED_BITS: tuple[int, ...] = QUANT_BITS  # the integer formats of moec.core.formats

#: Smallest accepted group size (tiny test models); real models use 32, 64 or 128.
MIN_GROUP_SIZE = 8

#: A method maps grouped float32 weights ``[N, G, gs]``, bits and optional importance
#: (broadcastable to ``[1, G, gs]``) to ``(scale float16 [N, G], zero uint8 [N, G])``.
QuantMethod = Callable[[np.ndarray, int, "np.ndarray | None"], tuple[np.ndarray, np.ndarray]]

QUANT_METHODS: dict[str, QuantMethod] = {
    "rtn": rtn_params,
    "mse": mse_params,
    "hqq": hqq_params,
}


@dataclass
class QuantizedTensor:
    """A group-wise asymmetrically quantized weight ``w [N, K] = [out_features, in_features]``.

    Groups run along K: group ``g`` of row ``n`` covers ``w[n, g*group_size:(g+1)*group_size]``
    and dequantizes as ``(q - zero[n, g]) * scale[n, g]``.

    Attributes
    ----------
    q : np.ndarray
        uint8 ``[N, K]``, values in ``[0, 2**bits - 1]`` (unpacked).
    scale : np.ndarray
        float16 ``[N, K // group_size]``, always positive and finite; with double-quantized
        scales (``scales`` ``u8``) the uint8 scale codes ``[N, K // group_size]`` instead.
    zero : np.ndarray
        uint8 ``[N, K // group_size]`` integer zero points in ``[0, 2**bits - 1]``.
    bits : int
        Bit width, one of :data:`SUPPORTED_BITS`.
    group_size : int
        Number of consecutive input channels sharing one scale and zero point.
    scales : str
        Scale format (``moec.core.formats.SCALE_FORMATS``): ``fp16`` or ``u8``.
    super_scale : np.ndarray | None
        float16 ``[N, ceil(G / super_groups)]`` super-scales of ``u8`` scales, else None.
    """

    q: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    bits: int
    group_size: int
    scales: str = DEFAULT_SCALES
    super_scale: np.ndarray | None = None

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.q.ndim != 2 or self.q.dtype != np.uint8:
            raise MoecError(f"QuantizedTensor.q must be a 2-D uint8 array, got {self.q.dtype} "
                            f"{self.q.shape}")
        check_group_size(self.group_size, self.q.shape[1])
        groups = (self.q.shape[0], self.q.shape[1] // self.group_size)
        fmt = get_scale_format(self.scales)
        checks = [("scale", self.scale, np.dtype(fmt.code_dtype), groups), ("zero", self.zero, np.uint8, groups)]
        if fmt.double_quantized:
            sup = (groups[0], super_blocks(groups[1], fmt.super_groups))
            checks.append(("super_scale", self.super_scale, np.float16, sup))
        elif self.super_scale is not None:
            raise MoecError("QuantizedTensor.super_scale is only for double-quantized scales")
        for name, arr, dtype, shape in checks:
            if arr is None or arr.shape != shape or arr.dtype != dtype:
                raise MoecError(f"QuantizedTensor.{name} must be {np.dtype(dtype).name} {shape}, "
                                f"got {getattr(arr, 'dtype', None)} {getattr(arr, 'shape', None)}")

    def float_scales(self) -> np.ndarray:
        """float32 ``[N, G]`` per-group scales as dequantization uses them (``c · S`` for ``u8``)."""
        fmt = get_scale_format(self.scales)
        if fmt.double_quantized:
            return group_scales(self.scale, self.super_scale, fmt.super_groups)
        return self.scale.astype(np.float32)

    @property
    def shape(self) -> tuple[int, int]:
        """``(N, K)`` of the original weight."""
        return self.q.shape


def check_bits(bits: int) -> None:
    """Raise :class:`MoecError` unless ``bits`` is one of :data:`SUPPORTED_BITS`."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or bits not in SUPPORTED_BITS:
        raise MoecError(f"unsupported bits {bits!r}; choices: "
                        f"{', '.join(map(str, SUPPORTED_BITS))} (16 = keep float, not quantized)")


def check_group_size(group_size: int, k: int) -> None:
    """Raise :class:`MoecError` unless ``group_size`` is an integer >= 8 dividing ``k``."""
    if (isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer))
            or group_size < MIN_GROUP_SIZE):
        raise MoecError(f"group_size must be an integer >= {MIN_GROUP_SIZE} (usually 32, 64 or "
                        f"128), got {group_size!r}")
    if k % group_size != 0:
        raise MoecError(f"group_size {group_size} does not divide the input dimension K={k}")


def _check_method(method: str) -> QuantMethod:
    if method == "gptq":
        # GPTQ needs a Hessian per weight; it is not a QuantMethod (no silent RTN fallback here).
        raise MoecError("method 'gptq' needs calibration Hessians: call moec.quant.gptq.gptq_quantize("
                        "w, bits, group_size, hessian), or pack a plan with method 'gptq' and "
                        "hessians=moec.profile.importance.expert_hessians(...); quantize() method "
                        f"choices: {', '.join(sorted(QUANT_METHODS))}")
    try:
        return QUANT_METHODS[method]
    except (KeyError, TypeError):
        raise MoecError(f"unknown quantization method {method!r}; choices: "
                        f"{', '.join(sorted(QUANT_METHODS))}") from None


def _as_weight(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2:
        raise MoecError(f"weight must be 2-D [out_features, in_features], got shape {w.shape}")
    if not np.issubdtype(w.dtype, np.floating):
        raise MoecError(f"weight must be a floating-point array, got {w.dtype}")
    w = np.ascontiguousarray(w, dtype=np.float32)
    if not np.isfinite(w).all():
        raise MoecError("weight contains NaN or infinite values")
    return w


def _as_importance(importance: np.ndarray | None, k: int, group_size: int) -> np.ndarray | None:
    if importance is None:
        return None
    imp = np.asarray(importance, dtype=np.float32)
    if imp.shape != (k,):
        raise MoecError(f"importance must have one value per input channel, shape ({k},), "
                        f"got {imp.shape}")
    if not np.isfinite(imp).all() or (imp < 0).any():
        raise MoecError("importance must be finite and non-negative")
    return imp.reshape(1, k // group_size, group_size)


def quantize(w: np.ndarray, bits: int, group_size: int, method: str = "rtn",
             importance: np.ndarray | None = None, scales: str = DEFAULT_SCALES) -> QuantizedTensor:
    """Quantize ``w [N, K]`` group-wise (groups along K) with asymmetric integer zero points.

    Per group: ``scale = (hi - lo) / (2**bits - 1)`` in float32 with ``[lo, hi]`` the group range
    extended to include 0 (and possibly shrunk by the method), rounded *up* to float16 (the stored
    value); ``zero = clamp(round(-lo / scale), 0, 2**bits - 1)``;
    ``q = clamp(round(w / scale) + zero, 0, 2**bits - 1)``. All arithmetic is float32 with the
    stored fp16 scale, so :func:`dequantize` uses exactly the values the rounding used.

    Parameters
    ----------
    w : np.ndarray
        Floating-point ``[N, K] = [out_features, in_features]`` weight (computed in float32).
    bits : int
        One of :data:`SUPPORTED_BITS`.
    group_size : int
        32, 64 or 128 for real models; any divisor of K that is >= 8 is accepted.
    method : str
        A key of :data:`QUANT_METHODS`: ``"rtn"``, ``"mse"`` or ``"hqq"``.
    importance : np.ndarray | None
        Optional non-negative ``[K]`` per-input-channel weights (e.g. mean ``x**2`` of the
        activations this weight sees); error-minimising methods then minimise
        ``sum(importance * (w - deq)**2)``. ``None`` means plain squared error.
    scales : str
        Scale format: ``fp16`` (the method's scales as they are) or ``u8`` (double-quantized:
        :func:`moec.quant.double_quant.double_quantize_params` re-fits codes and zeros to them).

    Returns
    -------
    QuantizedTensor

    Raises
    ------
    MoecError
        On unsupported bits or method, a group size that does not divide K, a non-2-D or
        non-finite weight, a bad importance vector, or weights too large for fp16 scales.
    """
    check_bits(bits)
    fn = _check_method(method)
    fmt = get_scale_format(scales)
    w = _as_weight(w)
    check_group_size(group_size, w.shape[1])
    imp = _as_importance(importance, w.shape[1], group_size)
    bits, group_size = int(bits), int(group_size)
    wg = group_view(w, group_size)
    scale, zero = fn(wg, bits, imp) if fn is rtn_params else by_row_blocks(fn, wg, bits, imp)
    sup = None
    if fmt.double_quantized:
        scale, sup, zero = double_quantize_params(wg, scale, zero, bits, imp, fmt.name)
        q = affine_quantize(wg, group_scales(scale, sup, fmt.super_groups), zero, bits).reshape(w.shape)
    else:
        q = affine_quantize(wg, scale, zero, bits).reshape(w.shape)
    return QuantizedTensor(q=q, scale=np.ascontiguousarray(scale, dtype=fmt.code_dtype),
                           zero=np.ascontiguousarray(zero, dtype=np.uint8), bits=bits,
                           group_size=group_size, scales=fmt.name, super_scale=sup)


def dequantize(qt: QuantizedTensor) -> np.ndarray:
    """Reconstruct ``(q - zero) * scale`` as float32 ``[N, K]``.

    Parameters
    ----------
    qt : QuantizedTensor

    Returns
    -------
    np.ndarray
        float32 ``[N, K]``.
    """
    n, k = qt.q.shape
    if int(qt.q.max(initial=0)) > max_level(qt.bits):
        raise MoecError(f"quantized values exceed the {qt.bits}-bit range")
    qg = qt.q.reshape(n, k // qt.group_size, qt.group_size)
    return affine_dequantize(qg, qt.float_scales(), qt.zero).reshape(n, k)


def quantize_with(w: np.ndarray, bits: int, group_size: int, scale: np.ndarray,
                  zero: np.ndarray) -> QuantizedTensor:
    """Quantize ``w [N, K]`` with given per-group ``scale`` (float16) and ``zero`` (uint8) ``[N, K / group]``.

    The codes are ``clamp(round(w / scale) + zero, 0, 2**bits - 1)`` in float32, the same
    arithmetic as :func:`quantize`; used for the scales and zeros ``moec finetune`` learned.
    """
    check_bits(bits)
    w = _as_weight(w)
    check_group_size(group_size, w.shape[1])
    q = affine_quantize(group_view(w, int(group_size)), np.asarray(scale), np.asarray(zero), int(bits))
    return QuantizedTensor(q=q.reshape(w.shape), scale=np.ascontiguousarray(scale, dtype=np.float16),
                           zero=np.ascontiguousarray(zero, dtype=np.uint8), bits=int(bits),
                           group_size=int(group_size))
