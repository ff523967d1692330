"""Fake quantization of torch weights: dequantize(quantize(w)) through the same numpy numerics as export."""

from __future__ import annotations

import numpy as np
import torch

from moec.core.formats import FLOAT_BITS
from moec.core.errors import MoecError
from moec.quant.quantize import dequantize, quantize

#: Bit width meaning "keep the weight in floating point".


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, method: str = "rtn",
                  importance: torch.Tensor | np.ndarray | None = None) -> torch.Tensor:
    """Return ``dequantize(quantize(w))`` as a float32 tensor of ``w``'s shape and device.

    Uses :func:`moec.quant.quantize.quantize` and :func:`~moec.quant.quantize.dequantize`
    directly, so fake-quantized evaluation, export and every back end agree bit for bit.

    Parameters
    ----------
    w : torch.Tensor
        ``[N, K] = [out_features, in_features]`` weight (any float dtype, any device).
    bits : int
        A bit width in ``SUPPORTED_BITS``, or 16 to keep ``w`` unchanged.
    group_size : int
        Group size along K.
    method : str
        Quantization method (see ``QUANT_METHODS``).
    importance : torch.Tensor | np.ndarray | None
        Optional non-negative ``[K]`` per-input-channel weights for error-minimising methods.

    Returns
    -------
    torch.Tensor
        float32 ``[N, K]`` on ``w.device``; ``w`` itself when ``bits == 16``.
    """
    if bits == FLOAT_BITS and not isinstance(bits, bool):
        return w
    if not isinstance(w, torch.Tensor):
        raise MoecError(f"fake_quantize expects a torch.Tensor, got {type(w).__name__}")
    if isinstance(importance, torch.Tensor):
        importance = importance.detach().to(device="cpu", dtype=torch.float32).numpy()
    arr = w.detach().to(device="cpu", dtype=torch.float32).numpy()
    deq = dequantize(quantize(arr, bits, group_size, method=method, importance=importance))
    return torch.from_numpy(deq).to(w.device)
