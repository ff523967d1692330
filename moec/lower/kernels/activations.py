"""Int8 activation quantization of the int8-activation kernels (per group, symmetric): the numpy reference."""

from __future__ import annotations

import numpy as np


#: Activation types of the decode GEMV: float32 (exact) or int8 (onnxruntime accuracy_level 4).
ACTIVATIONS: tuple[str, ...] = ("float32", "int8")
#: What compile and build take: one of :data:`ACTIVATIONS`, or ``auto``: int8 where the target's kernels
#: have an int8-activation GEMV (x86 with AVX-512 VNNI, ARM with dotprod), float32 elsewhere (the
#: reference emitter, CUDA). The bundle's manifest records the resolved type.
AUTO = "auto"
ACTIVATION_CHOICES: tuple[str, ...] = (AUTO, *ACTIVATIONS)



def quantize_activations(x: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """What an int8-activation kernel does to ``x [R, K]`` before its integer dot products.

    Per row and group of ``group_size`` inputs: ``sx = max(|x|, 1e-30) / 127`` (float32) and
    ``x8 = round(x / sx)`` (int8, in [-127, 127]); the kernel then computes
    ``y = sum_g scale_g * sx_g * (sum_i q_i * x8_i - zero_g * sum_i x8_i)``.

    Parameters
    ----------
    x : np.ndarray
        float32 ``[R, K]``.
    group_size : int
        The weight's quantization group size (divides K).

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        ``x8`` int8 ``[R, K]`` and ``sx`` float32 ``[R, K // group_size]``.
    """
    r, k = x.shape
    xg = np.asarray(x, np.float32).reshape(r, k // group_size, group_size)
    sx = np.maximum(np.abs(xg).max(axis=-1), np.float32(1e-30)) / np.float32(127)
    x8 = np.round(xg / sx[..., None]).astype(np.int8)
    return x8.reshape(r, k), sx.astype(np.float32)


def dequantized_activations(x: np.ndarray, group_size: int) -> np.ndarray:
    """``x`` as the int8 kernels see it, back in float32 (``x8 * sx``): the tests' reference input."""
    x8, sx = quantize_activations(x, group_size)
    r, k = x.shape
    return (x8.reshape(r, -1, group_size).astype(np.float32) * sx[..., None]).reshape(r, k)
