"""Shared helpers of the kernel tests: random expert stacks, their references, compiled-kernel cache."""

from __future__ import annotations

import numpy as np
import tvm

from moec.lower.kernels.factory import compile_kernel, host_target
from moec.lower.kernels.layout import stack_kernel_layouts, to_kernel_layout
from moec.lower.schedules import kernel_tile
from moec.quant.packed_model import pack_weight


def expert_stack(bits: int, n: int, k: int, gs: int, experts: int, seed: int = 0, activations: str = "float32"):
    """(kernel-layout stack, dequantized float32 reference weights) of ``experts`` random experts, in the
    layout tile of kernels taking ``activations``."""
    rng = np.random.default_rng(seed)
    tile = kernel_tile(host_target(), n, bits, activations)
    ws = [(rng.standard_normal((n, k)) * 0.1).astype(np.float32) for _ in range(experts)]
    if bits == 32:
        return stack_kernel_layouts([to_kernel_layout(w, tile) for w in ws]), ws
    pws = [pack_weight(w, bits, gs) for w in ws]
    return stack_kernel_layouts([to_kernel_layout(p, tile) for p in pws]), [p.dequantize() for p in pws]


def weight_args(stack: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The weight parameters of a kernel in order: weight (, scale, zero)."""
    return [stack["weight"]] + ([stack["scale"], stack["zero"]] if "scale" in stack else [])


def call(mod, name: str, arrays: list[np.ndarray]) -> np.ndarray:
    """Run kernel ``name`` of ``mod`` on numpy arrays (the last one is the output) and return it."""
    args = [tvm.runtime.tensor(a, tvm.cpu()) for a in arrays]
    mod[name](*args)
    return args[-1].numpy()


def assert_close(out: np.ndarray, ref: np.ndarray) -> None:
    """Equal within rtol 1e-4 and atol 1e-4 of the output's scale."""
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


class KernelCache:
    """Compiled kernels keyed by their construction arguments (one build per distinct kernel)."""

    def __init__(self, target: tvm.target.Target) -> None:
        self.target = target
        self._mods: dict[tuple, object] = {}

    def get(self, make, *args, **kwargs):
        key = (make.__name__, args, tuple(sorted(kwargs.items())))
        if key not in self._mods:
            self._mods[key] = compile_kernel(make(*args, self.target, **kwargs), self.target)
        return self._mods[key]


def check_int8_gemv(mod, stack, pws, bits: int, gs: int, per_expert: bool) -> None:
    """Call an int8-activation routed-expert GEMV (``top_k`` = 2) on random activations with ids ``[2, 0]``
    (``per_expert``: one activation row each) or ``[-1, 1]`` (an unrouted row, which must be written 0)
    and check each row against the int8-rounded activations times the dequantized expert."""
    from moec.lower.kernels.activations import dequantized_activations
    k = pws[0].shape[1]
    n = pws[0].shape[0]
    x = np.random.default_rng(bits + 1).standard_normal((2 if per_expert else 1, k)).astype(np.float32)
    ids = np.array([2, 0] if per_expert else [-1, 1], np.int32)
    out = call(mod, "gemv", [x] + weight_args(stack) + [ids, np.full((2, n), 7.0, np.float32)])
    xq = dequantized_activations(x, gs)
    for r, e in enumerate(ids):
        if e < 0:
            assert (out[r] == 0).all()
        else:
            assert_close(out[r], xq[r if per_expert else 0] @ pws[e].dequantize().T)
