"""Differentiable fake quantization with learnable per-group scales and zeros (LSQ-style, straight-through).

The forward pass is bit for bit :func:`moec.quant.affine.affine_quantize` followed by
:func:`~moec.quant.affine.affine_dequantize` with the *stored* parameters: the scale rounded to
float16 and the zero rounded to an integer in ``[0, 2**bits - 1]``; codes
``clamp(round(w / s) + z, 0, 2**bits - 1)`` in float32. So the checkpoint's weights quantized
with the exported ``(scale, zero)`` (:func:`moec.quant.quantize.quantize_with`) give exactly the
weights training saw.

Gradients: ``round`` and the float16 cast pass gradients straight through, so the scale gets
LSQ's gradient ``round(w / s) - w / s`` inside the range and ``q - z`` at the clamp, the weight
gets 1 inside the range and 0 where clamped, and the zero gets ``-s`` where clamped. The scale
is parametrised by its logarithm (always positive; Adam steps are relative).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from moec.quant.affine import group_view, max_level
from moec.quant.quantize import quantize


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


class _Fp16STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.to(torch.float16).to(torch.float32)

    @staticmethod
    def backward(ctx, g):
        return g


def to_fp16(w: torch.Tensor) -> torch.Tensor:
    """``w`` rounded to float16 (how a plan's float weights are stored), gradients passed straight through."""
    return _Fp16STE.apply(w)


#: Smallest scale training may reach (a positive normal float16).
MIN_SCALE = 2.0 ** -14


class GroupQuant(nn.Module):
    """Learnable quantization parameters of one ``[N, K]`` weight at one bit-width.

    Initialised from one of moec's quantizers (``quantize(w, bits, group_size, method)``), so at
    step 0 the fake-quantized weight equals post-training quantization with that method.
    """

    def __init__(self, w: torch.Tensor, bits: int, group_size: int, method: str = "mse") -> None:
        super().__init__()
        self.bits, self.group_size = int(bits), int(group_size)
        qt = quantize(w.detach().float().cpu().numpy(), bits, group_size, method=method)
        self.log_scale = nn.Parameter(torch.from_numpy(np.log(qt.scale.astype(np.float32))))
        self.zero = nn.Parameter(torch.from_numpy(qt.zero.astype(np.float32)))

    def stored(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The float32 values of the stored scale (float16) and zero (integer), with straight-through gradients."""
        s = _Fp16STE.apply(torch.exp(self.log_scale).clamp(min=MIN_SCALE))
        z = _RoundSTE.apply(self.zero).clamp(0, max_level(self.bits))
        return s, z

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        n, k = w.shape
        s, z = self.stored()
        s, z = s[..., None], z[..., None]
        wg = w.reshape(n, k // self.group_size, self.group_size)
        q = (_RoundSTE.apply(wg / s) + z).clamp(0, max_level(self.bits))
        return ((q - z) * s).reshape(n, k)

    @torch.no_grad()
    def export(self) -> tuple[np.ndarray, np.ndarray]:
        """``(scale float16, zero uint8)`` ``[N, K / group]``: what :func:`forward` used."""
        s, z = self.stored()
        return s.to(torch.float16).numpy(), z.to(torch.uint8).numpy()

    @torch.no_grad()
    def codes(self, w: torch.Tensor) -> np.ndarray:
        """uint8 codes ``[N, K]`` of ``w`` under the stored parameters (for tests and checks)."""
        s, z = (t.numpy() for t in self.stored())
        arr = group_view(w.detach().float().numpy(), self.group_size)
        q = np.clip(np.round(arr / s[..., None]) + z[..., None], 0, max_level(self.bits))
        return q.astype(np.uint8).reshape(w.shape)
