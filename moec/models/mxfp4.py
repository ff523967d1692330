"""MXFP4 (OCP microscaling FP4) tensors of gpt-oss checkpoints, dequantized to float32 on load."""

from __future__ import annotations

import torch

from moec.core.errors import MoecError

#: The 16 E2M1 values, indexed by the 4-bit code (sign bit 3).
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, name: str) -> torch.Tensor:
    """``blocks [.., N, G, 16]`` and ``scales [.., N, G]`` (uint8) -> float32 ``[.., N, G * 32]``.

    Each byte of ``blocks`` holds two E2M1 codes (low nibble first along K); each group of 32
    values along K shares the scale ``2 ** (scales - 127)`` (E8M0).
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise MoecError(f"checkpoint tensor '{name}_blocks'/'{name}_scales' must be uint8 (MXFP4)")
    if blocks.dim() < 2 or blocks.shape[-1] != 16 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise MoecError(f"checkpoint tensor '{name}_blocks' has shape {list(blocks.shape)}, '{name}_scales' "
                        f"{list(scales.shape)}; MXFP4 needs [.., G, 16] blocks and [.., G] scales")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    codes = blocks.to(torch.int64)
    values = torch.stack([lut[codes & 15], lut[codes >> 4]], dim=-1).flatten(-2)        # [.., G, 32]
    values = torch.ldexp(values, scales.to(torch.int32)[..., None] - 127)
    return values.flatten(-2)
