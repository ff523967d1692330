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


def check_dot(dot, codes: np.ndarray, x4: np.ndarray, acc: np.ndarray, target, codes_as: str) -> None:
    """A 4-byte dot ``dot(acc, codes, x4)`` (``codes`` passed as ``codes_as``, e.g. ``"int8x64"`` or
    ``"uint32x8"``), compiled for ``target``, against numpy: ``acc`` plus each lane's 4 byte products."""
    from tvm.script import tirx as T
    lanes, nbytes = len(acc), len(codes)

    @T.prim_func
    def kernel(c: T.Buffer((nbytes,), str(codes.dtype)), x: T.Buffer((nbytes,), "int8"),
               a: T.Buffer((lanes,), "int32"), out: T.Buffer((lanes,), "int32")):
        out[T.ramp(0, 1, lanes)] = dot(a[T.ramp(0, 1, lanes)], T.reinterpret(codes_as, c[T.ramp(0, 1, nbytes)]),
                                       x[T.ramp(0, 1, nbytes)])

    got = call(compile_kernel(kernel, target), "main", [codes, x4, acc, np.zeros(lanes, np.int32)])
    want = acc + (codes.astype(np.int64) * x4.astype(np.int64)).reshape(lanes, 4).sum(1)
    np.testing.assert_array_equal(got, want)


def check_int8_swiglu(mod, w1, w3, tile: int, gs: int) -> None:
    """An int8 SwiGLU GEMV (``top_k`` = 2, one ``[w1; w3]`` stack in ``tile``-row tiles) against
    ``silu(w1 x) * (w3 x)`` on the int8-rounded activations."""
    from moec.lower.kernels.activations import dequantized_activations
    from moec.lower.kernels.layout import swiglu_weight
    n, k = w1[0].shape
    stack = stack_kernel_layouts([to_kernel_layout(swiglu_weight(a, b), tile) for a, b in zip(w1, w3)])
    x = np.random.default_rng(7).standard_normal((1, k)).astype(np.float32)
    ids = np.array([1, 0], np.int32)
    out = call(mod, "gemv", [x] + weight_args(stack) + [ids, np.zeros((2, n), np.float32)])
    xq = dequantized_activations(x, gs)[0]
    gate = np.stack([xq @ w1[e].dequantize().T for e in ids])
    up = np.stack([xq @ w3[e].dequantize().T for e in ids])
    np.testing.assert_allclose(out, gate / (1 + np.exp(-gate)) * up, rtol=2e-3, atol=2e-3 * np.abs(up).max())


def run_int8_grouped_gemm(mod, stack, deq, counts: list[int], gs: int, seed: int):
    """Call an int8-activation grouped GEMM on ``len(counts)`` experts (``counts`` pairs each) whose pairs gather
    rows of a 5-row ``x`` by index (a token routed to several experts). Returns ``(out, ref, x, rows, offsets)``,
    ``ref`` the int8-rounded rows times the dequantized weights ``deq``."""
    from moec.lower.kernels.activations import dequantized_activations
    n, k = deq[0].shape
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((5, k)).astype(np.float32)
    rows = rng.integers(0, 5, int(offsets[-1])).astype(np.int32)
    out = call(mod, "grouped_gemm", [x, rows] + weight_args(stack) + [offsets, np.zeros((len(rows), n), np.float32)])
    xr = dequantized_activations(x, gs)[rows]
    ref = np.concatenate([xr[offsets[e]:offsets[e + 1]] @ deq[e].T for e in range(len(counts))])
    return out, ref, x, rows, offsets


def prefill_and_steps(cfg, params, emitter, path, tokens: list[int], split: int) -> list[np.ndarray]:
    """[logits after ``tokens`` prefilled in two chunks (``tokens[:split]`` from position 0, then the rest over the
    cache the first wrote), logits after the same tokens as decode steps] of ``emitter``'s graph with the plain CPU
    phases (no scheduling: the TIR alone is under test; ``params`` put in the emitter's layout on a copy)."""
    import copy

    from moec.lower.backends.base import Backend
    from moec.lower.kernel_linear import apply_kernel_layout
    from moec.lower.library import build_module
    from moec.lower.pipeline import CPU_PHASES
    params = copy.deepcopy(params)
    apply_kernel_layout(params, emitter)
    unscheduled = Backend("unscheduled", tuple(p for p in CPU_PHASES if p[0] != "schedule"))
    build_module(cfg, params, tvm.target.Target({"kind": "llvm"}), unscheduled, path, emitter=emitter)
    vm = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())
    args = [tvm.runtime.tensor(a, tvm.cpu()) for _, a in params.flat()]
    out = []
    for chunks in ([tokens[:split], tokens[split:]], [[t] for t in tokens]):
        (kh, kw), (vh, vw) = cfg.kv_cache_shapes()  # MLA: one latent "head"
        cache = [tvm.runtime.tensor(np.zeros((h, len(tokens), w), np.float32))
                 for _ in range(cfg.num_layers) for h, w in ((kh, kw), (vh, vw))]
        pos = 0
        for chunk in chunks:
            res = vm["prefill" if len(chunk) > 1 else "decode"](
                tvm.runtime.tensor(np.array(chunk, np.int32)), tvm.runtime.tensor(np.array([pos], np.int64)),
                *cache, *args)
            pos += len(chunk)
        out.append(res[0].numpy()[-1])
    return out
