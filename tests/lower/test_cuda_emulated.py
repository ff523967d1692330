"""The bound (threaded) CUDA GEMVs run as CUDA C on this CPU (``cuda_host.py``): the source TVM generates for a
GPU, its threads, shared memory, barrier and warp shuffles emulated, launched with the PrimFunc's grid and
block, in two thread orders; against the same references as the serial forms (``test_gpu_int8.py``,
``test_gpu_nested.py``). Also checks the emulator: shuffle lanes, a missing barrier and a divergent shuffle."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from moec.core.formats import get_nested_format
from moec.lower.kernels.activations import dequantized_activations
from moec.lower.kernels.cuda_layout import to_run_layout
from moec.lower.schedules.cuda_gemv import cuda_fixed_gemv, cuda_nested_gemv
from moec.quant.nested import dequantize_nested, nest
from moec.quant.packed_model import pack_weight

from cuda_host import HostKernel

pytestmark = [pytest.mark.tvm, pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")]

E, TOP_K, GS, IDS = 4, 3, 64, np.asarray([3, 0, 1], np.int32)


def _silu(v):
    return v / (1 + np.exp(-v))


def _run(kern: HostKernel, output: str = "y", **arrays) -> np.ndarray:
    """The ``output`` of a launch in thread order and in reverse, which must agree bit for bit (no race)."""
    y = np.full(tuple(int(s) for s in kern.buffers[output].shape), np.nan, np.float32)
    got = [kern(reverse=r, **{output: y}, **arrays)[output] for r in (False, True)]
    np.testing.assert_array_equal(got[0], got[1])
    return got[0]


def _close(got, want):
    np.testing.assert_allclose(got, want, rtol=0, atol=3e-6 * float(np.abs(want).max()))


def _inputs(xr: int, k: int, acts: str, seed: int = 5):
    x = np.random.default_rng(seed).standard_normal((xr, k)).astype(np.float32)
    return x, dequantized_activations(x, GS) if acts == "int8" else x


def _fixed(bits: int, n: int, k: int, seed: int):
    rng = np.random.default_rng(seed)
    return [pack_weight((rng.standard_normal((n, k)) * 0.1).astype(np.float32), bits, GS) for _ in range(E)]


def _fixed_arrays(pws, prefix: str = "", run_layout: bool = False) -> dict[str, np.ndarray]:
    out = {prefix + a: np.stack([getattr(p, a) for p in pws]) for a in ("packed", "scale", "zero")}
    if run_layout:
        out[prefix + "packed"] = to_run_layout(out[prefix + "packed"], pws[0].bits, pws[0].shape[1])
    return out


def _nested_arrays(nws, storage: int, run_layout: bool, prefix: str = "") -> dict[str, np.ndarray]:
    fmt = get_nested_format(storage)
    k = nws[0].shape[1]
    out = {}
    for s, b in enumerate(fmt.segment_bits):
        seg = np.stack([nw.segments[s] for nw in nws])
        out[f"{prefix}seg{s}"] = to_run_layout(seg, b, k) if run_layout else seg
    out.update({prefix + a: np.stack([getattr(nw, a) for nw in nws]) for a in ("scale", "zero")})
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("acts, xr, n, k, opts", [
    ("int8", 1, 64, 1024, {}),                      # one warp quantizes the row (32 runs of 32)
    ("int8", 3, 128, 3072, {"tiles": 2}),           # three warps quantize, each block two row tiles
    ("int8", 1, 64, 4096, {"vector": 16}),          # 256 runs: two passes of the block's threads
    ("float32", 3, 64, 1024, {}),
    ("float32", 1, 64, 1024, {"magic": True, "rows": 2}),
])
def test_bound_fixed_gemv_runs_as_cuda_c(bits, acts, xr, n, k, opts):
    """Every fixed width, float32 and int8 activations (3-bit int8 in runs of 32 from the run layout)."""
    laid = bits == 3 and acts == "int8" and "vector" not in opts
    kern = HostKernel.of(cuda_fixed_gemv(bits, n, k, E, TOP_K, GS, xr, activations=acts, run_layout=laid, **opts))
    pws = _fixed(bits, n, k, bits)
    x, xd = _inputs(xr, k, acts)
    y = _run(kern, x=x, ids=IDS, **_fixed_arrays(pws, run_layout=laid))
    for r, e in enumerate(IDS):
        _close(y[r], pws[e].dequantize() @ xd[r if xr > 1 else 0])


@pytest.mark.parametrize("storage", [8, 4])
@pytest.mark.parametrize("acts, run_layout, xr, k, opts", [
    ("int8", True, 1, 1024, {}),
    ("int8", True, 3, 2048, {"tiles": 4}),
    ("int8", False, 1, 1024, {"vector": 16}),
    ("float32", False, 3, 1024, {}),
])
def test_bound_nested_gemv_runs_as_cuda_c(storage, acts, run_layout, xr, k, opts):
    """Each expert at its own derived width, every width a block branch: the derived weights times the
    activations."""
    n = 128
    rng = np.random.default_rng(storage)
    nws = [nest(pack_weight((rng.standard_normal((n, k)) * 0.1).astype(np.float32), storage, GS)) for _ in range(E)]
    kern = HostKernel.of(cuda_nested_gemv(storage, n, k, E, TOP_K, GS, xr, activations=acts, run_layout=run_layout,
                                          **opts))
    x, xd = _inputs(xr, k, acts)
    widths = get_nested_format(storage).derived_bits
    for prec in ([widths[i % len(widths)] for i in range(E)], [widths[-1 - i % 2] for i in range(E)]):
        y = _run(kern, x=x, ids=IDS, prec=np.asarray(prec, np.int32), **_nested_arrays(nws, storage, run_layout))
        for r, e in enumerate(IDS):
            _close(y[r], dequantize_nested(nws[e], prec[e]) @ xd[r if xr > 1 else 0])


@pytest.mark.parametrize("acts", ["int8", "float32"])
def test_bound_swiglu_gemvs_run_as_cuda_c(acts):
    """Gate and up rows in one call, fixed 4-bit and nested 8-bit storage (int8: its run layout)."""
    n, k = 64, 2048
    x, xd = _inputs(1, k, acts, seed=7)
    gate, up = _fixed(4, n, k, 1), _fixed(4, n, k, 2)
    kern = HostKernel.of(cuda_fixed_gemv(4, n, k, E, TOP_K, GS, 1, swiglu=True, activations=acts))
    y = _run(kern, x=x, ids=IDS, **_fixed_arrays(gate), **_fixed_arrays(up, "u"))
    for r, e in enumerate(IDS):
        _close(y[r], _silu(gate[e].dequantize() @ xd[0]) * (up[e].dequantize() @ xd[0]))
    laid = acts == "int8"
    gn, un = ([nest(pack_weight(p.dequantize(), 8, GS)) for p in ws] for ws in (gate, up))
    kern = HostKernel.of(cuda_nested_gemv(8, n, k, E, TOP_K, GS, 1, swiglu=True, activations=acts,
                                          run_layout=laid))
    prec = np.asarray([2, 3, 4, 8], np.int32)
    y = _run(kern, x=x, ids=IDS, prec=prec, **_nested_arrays(gn, 8, laid), **_nested_arrays(un, 8, laid, "u"))
    for r, e in enumerate(IDS):
        _close(y[r], _silu(dequantize_nested(gn[e], prec[e]) @ xd[0]) * (dequantize_nested(un[e], prec[e]) @ xd[0]))


@pytest.mark.parametrize("bits, width", [(2, None), (3, None), (8, None), (8, 4), (4, 2)])
def test_fused_gemv_schedule_runs_as_cuda_c(bits, width):
    """The TE GEMV forms (shapes the hand kernels do not take) under the GPU schedule rules (``FusedGemv``: a warp a
    row, staged activations and codes): the scheduled kernel's CUDA C against the same module on the CPU."""
    import sys

    import tvm
    from tvm import relax

    from moec.core.targets import load_target
    from moec.lower.pipeline import CUDA_PHASES
    from tests.conftest import REPO
    sys.path.insert(0, str(REPO / "tools"))
    import gpu_kernels
    shape = {"n": 64, "k": 512, "experts": 4, "top_k": 2, "group": 64}
    target = load_target("cuda:sm_87").tvm()
    mod = gpu_kernels.expert_gemv_module(bits, **shape, width=width, expert_kernel="te")
    with target:
        for _, passes in CUDA_PHASES[:3]:  # dispatch, legalize, schedule
            mod = tvm.transform.Sequential(passes(target))(mod)
    (name,) = [gv.name_hint for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    kern = HostKernel.of(mod[name].with_attr("global_symbol", name))
    args = gpu_kernels.inputs(bits, **shape, width=width)
    cpu = tvm.compile(gpu_kernels.expert_gemv_module(bits, **shape, width=width, expert_kernel="te"), target="llvm")
    want = relax.VirtualMachine(cpu, tvm.cpu())["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()
    names = [p.name for p in mod[name].params]
    got = _run(kern, **dict(zip(names[:-1], args)), output=names[-1])
    _close(got, want)


_SHUFFLES = r'''extern "C" __global__ void __launch_bounds__(64) shuffles(int* __restrict__ y_ptr) {
  int t = (int)threadIdx.x, v = t * 10;
  y_ptr[t] = __shfl_down_sync(__activemask(), v, 3, 32);
  y_ptr[64 + t] = __shfl_xor_sync(__activemask(), v, 5, 16);
  y_ptr[128 + t] = __shfl_sync(__activemask(), v, t + 7, 32);
  y_ptr[192 + t] = __shfl_up_sync(__activemask(), v, 2, 8);
}
'''


def test_emulated_shuffles_take_their_lanes():
    """Down, xor, indexed and up shuffles, full and partial widths, as CUDA defines them (two warps)."""
    y = HostKernel(_SHUFFLES, (1, 1, 1), (64, 1, 1))(y=np.zeros(256, np.int32))["y"]
    t = np.arange(64)
    lane, warp0 = t % 32, t - t % 32
    np.testing.assert_array_equal(y[:64], 10 * np.where(lane + 3 < 32, t + 3, t))
    np.testing.assert_array_equal(y[64:128], 10 * (t // 16 * 16 + (t % 16 ^ 5)))
    np.testing.assert_array_equal(y[128:192], 10 * (warp0 + (t + 7) % 32))
    np.testing.assert_array_equal(y[192:], 10 * np.where(t % 8 >= 2, t - 2, t))


def _exchange(sync: bool) -> str:
    return ('extern "C" __global__ void __launch_bounds__(64) exchange(float* __restrict__ x_ptr, '
            "float* __restrict__ y_ptr) {\n  __shared__ alignas(64) float s_ptr[64];\n"
            "  s_ptr[threadIdx.x] = x_ptr[blockIdx.x * 64 + threadIdx.x];\n"
            + ("  __syncthreads();\n" if sync else "")
            + "  y_ptr[blockIdx.x * 64 + threadIdx.x] = s_ptr[63 - threadIdx.x];\n}\n")


def test_emulator_catches_a_missing_barrier_and_a_divergent_shuffle():
    """Shared memory read across threads: right in both orders with its barrier, wrong in one without it. A
    shuffle half a warp never reaches ends the launch with an error, not a hang."""
    x = np.arange(256, dtype=np.float32)
    want = x.reshape(4, 64)[:, ::-1].ravel()
    for reverse in (False, True):
        got = HostKernel(_exchange(True), (4, 1, 1), (64, 1, 1))(reverse=reverse, x=x, y=np.zeros(256, np.float32))
        np.testing.assert_array_equal(got["y"], want)
    racy = HostKernel(_exchange(False), (4, 1, 1), (64, 1, 1))
    assert any(not np.array_equal(racy(reverse=r, x=x, y=np.zeros(256, np.float32))["y"], want) for r in (False, True))
    divergent = ('extern "C" __global__ void __launch_bounds__(32) divergent(int* __restrict__ y_ptr) {\n'
                 "  int v = threadIdx.x;\n  if (threadIdx.x < 16) v = __shfl_down_sync(0xffff, v, 1, 32);\n"
                 "  y_ptr[threadIdx.x] = v;\n}\n")
    with pytest.raises(RuntimeError, match="barrier not every thread"):
        HostKernel(divergent, (1, 1, 1), (32, 1, 1))(y=np.zeros(32, np.int32))
