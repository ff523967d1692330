"""The CUDA prefill grouped GEMM (``schedules/cuda_gemm.py``): its serial form compiled for the CPU and its bound
form's CUDA C run under the host emulation (``cuda_host.py``, both thread orders), against the dequantized (and
derived, nested) weights times each expert's rows: uneven experts (none, one, more than a token tile), fixed
2/3/4/8-bit, nested 8- and 4-bit storage at every width, float16 stacks, the dense form."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import tvm

from moec.core.errors import MoecError
from moec.core.formats import get_nested_format
from moec.lower.schedules.cuda_gemm import cuda_grouped_gemm
from moec.quant.nested import dequantize_nested, nest
from moec.quant.packed_model import pack_weight

from cuda_host import HostKernel
from kernel_helpers import assert_close

pytestmark = pytest.mark.tvm

N, K, GS, E = 128, 256, 64, 4  # 64-row, 32-k tiles (SMALL: 32-row, 16-k ones)

COUNTS = [3, 0, 37, 1]  # rows per expert: 37 spans two token tiles of 32, expert 1 has none


def _rows(k: int = K, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.concatenate([[0], np.cumsum(COUNTS)]).astype(np.int32)
    x = np.random.default_rng(seed).standard_normal((int(offsets[-1]), k)).astype(np.float32)
    return x, offsets


def _reference(x, offsets, weights) -> np.ndarray:
    return np.concatenate([x[offsets[e]:offsets[e + 1]] @ weights[e].T for e in range(len(weights))])


def _stack(kind: str, bits: int, n: int = N, k: int = K, gs: int = GS, seed: int = 0):
    """(kernel arrays by name, float32 weights per expert, per width for a nested stack)."""
    rng = np.random.default_rng(seed + bits)
    ws = [(rng.standard_normal((n, k)) * 0.1).astype(np.float32) for _ in range(E)]
    if kind == "float":
        return {"weight": np.stack(ws).astype(np.float16)}, [w.astype(np.float16).astype(np.float32) for w in ws]
    pws = [pack_weight(w, bits, gs) for w in ws]
    if kind == "fixed":
        return {a: np.stack([getattr(p, a) for p in pws]) for a in ("packed", "scale", "zero")}, \
            [p.dequantize() for p in pws]
    nws = [nest(p) for p in pws]
    arrays = {f"seg{s}": np.stack([nw.segments[s] for nw in nws]) for s in range(len(nws[0].segments))}
    arrays.update({a: np.stack([getattr(nw, a) for nw in nws]) for a in ("scale", "zero")})
    return arrays, nws


def _n(func) -> int:
    return int(func.params[-1].shape[1])  # y [rows, n]


def _serial(func, arrays: dict, out_rows: int) -> np.ndarray:
    mod = tvm.compile(tvm.IRModule({"g": func}), target="llvm")
    args = [tvm.runtime.tensor(arrays[p.name], tvm.cpu()) if p.name != "y"
            else tvm.runtime.tensor(np.full((out_rows, _n(func)), np.nan, np.float32), tvm.cpu()) for p in func.params]
    mod[func.attrs["global_symbol"]](*args)
    return args[-1].numpy()


def _emulated(func, arrays: dict, out_rows: int) -> np.ndarray:
    kern = HostKernel.of(func)
    y = np.full((out_rows, _n(func)), np.nan, np.float32)
    named = {p.name: arrays[p.name] for p in func.params if p.name != "y"}
    got = [kern(reverse=r, y=y, tokens=out_rows, **named)["y"] for r in (False, True)]
    np.testing.assert_array_equal(got[0], got[1])  # no race between the block's threads
    return got[0]


@pytest.mark.parametrize("form", ["serial", "bound"])
@pytest.mark.parametrize("kind, bits", [("fixed", 2), ("fixed", 3), ("fixed", 4), ("fixed", 8), ("float", 16)])
def test_grouped_gemm_matches_the_dequantized_experts(form, kind, bits):
    arrays, weights = _stack(kind, bits)
    x, offsets = _rows()
    func = cuda_grouped_gemm(kind, bits, N, K, E, GS if kind != "float" else None, bind=form == "bound")
    run = _serial if form == "serial" else _emulated
    if form == "bound" and shutil.which("g++") is None:
        pytest.skip("needs g++")
    y = run(func, {**arrays, "x": x, "offsets": offsets}, len(x))
    assert_close(y, _reference(x, offsets, weights))


@pytest.mark.parametrize("form", ["serial", "bound"])
@pytest.mark.parametrize("kind, bits", [("fixed", 3), ("nested", 8), ("float", 32)])
def test_small_tiles(form, kind, bits):
    """A shape the 64 × 32 tiles do not take (32 rows, groups of 16) runs on 32 × 16 ones (2 tokens a thread)."""
    if form == "bound" and shutil.which("g++") is None:
        pytest.skip("needs g++")
    n, k, gs = 32, 64, 16
    arrays, weights = _stack(kind, bits, n, k, gs)
    if kind == "float":
        arrays = {"weight": np.stack(weights)}
    if kind == "nested":
        widths = get_nested_format(bits).derived_bits
        prec = [widths[e % len(widths)] for e in range(E)]
        arrays["prec"] = np.asarray(prec, np.int32)
        weights = [dequantize_nested(nw, p) for nw, p in zip(weights, prec)]
    x, offsets = _rows(k)
    func = cuda_grouped_gemm(kind, bits, n, k, E, gs if kind != "float" else None, bind=form == "bound")
    run = _serial if form == "serial" else _emulated
    assert_close(run(func, {**arrays, "x": x, "offsets": offsets}, len(x)), _reference(x, offsets, weights))


@pytest.mark.parametrize("form", ["serial", "bound"])
@pytest.mark.parametrize("storage", [8, 4])
def test_nested_grouped_gemm_serves_every_width(form, storage):
    """Each expert at its own run-time width (two assignments cover every width at every expert position)."""
    if form == "bound" and shutil.which("g++") is None:
        pytest.skip("needs g++")
    arrays, nws = _stack("nested", storage)
    x, offsets = _rows()
    widths = get_nested_format(storage).derived_bits
    func = cuda_grouped_gemm("nested", storage, N, K, E, GS, bind=form == "bound")
    run = _serial if form == "serial" else _emulated
    for prec in ([widths[e % len(widths)] for e in range(E)], [widths[-1 - e % len(widths)] for e in range(E)]):
        y = run(func, {**arrays, "x": x, "offsets": offsets, "prec": np.asarray(prec, np.int32)}, len(x))
        assert_close(y, _reference(x, offsets, [dequantize_nested(nw, p) for nw, p in zip(nws, prec)]))


@pytest.mark.parametrize("form", ["serial", "bound"])
def test_dense_form_takes_every_row(form):
    if form == "bound" and shutil.which("g++") is None:
        pytest.skip("needs g++")
    arrays, weights = _stack("fixed", 4)
    one = {a: v[2:3] for a, v in arrays.items()}
    x = np.random.default_rng(9).standard_normal((45, K)).astype(np.float32)
    func = cuda_grouped_gemm("fixed", 4, N, K, 1, GS, dense=True, bind=form == "bound")
    run = _serial if form == "serial" else _emulated
    assert_close(run(func, {**one, "x": x}, len(x)), x @ weights[2].T)


@pytest.mark.parametrize("args", [("fixed", 4, 80, K, E, GS), ("fixed", 4, N, K, E, 24), ("fixed", 5, N, K, E, GS),
                                  ("float", 8, N, K, E, None), ("nested", 6, N, K, E, GS)])
def test_shapes_it_does_not_take_are_one_line_errors(args):
    with pytest.raises(MoecError) as err:
        cuda_grouped_gemm(*args)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("form", ["serial", "bound"])
@pytest.mark.parametrize("kind, bits", [("nested", 8), ("nested", 4), ("fixed", 3)])
def test_run_layout_stacks(form, kind, bits):
    """Stacks in the CUDA run layout (nested segments, fixed 3-bit codes: how int8-activation bundles store them)
    give the same products as in moec's layout."""
    from moec.lower.kernels.cuda_layout import to_run_layout
    if form == "bound" and shutil.which("g++") is None:
        pytest.skip("needs g++")
    arrays, weights = _stack(kind, bits)
    if kind == "nested":
        fmt = get_nested_format(bits)
        arrays = {a: to_run_layout(v, fmt.segment_bits[int(a[3:])], K) if a.startswith("seg") else v
                  for a, v in arrays.items()}
        prec = [fmt.derived_bits[e % len(fmt.derived_bits)] for e in range(E)]
        arrays["prec"] = np.asarray(prec, np.int32)
        weights = [dequantize_nested(nw, p) for nw, p in zip(weights, prec)]
    else:
        arrays["packed"] = to_run_layout(arrays["packed"], bits, K)
    x, offsets = _rows()
    func = cuda_grouped_gemm(kind, bits, N, K, E, GS, bind=form == "bound", run_layout=True)
    run = _serial if form == "serial" else _emulated
    assert_close(run(func, {**arrays, "x": x, "offsets": offsets}, len(x)), _reference(x, offsets, weights))


def test_run_layout_it_does_not_take_is_one_line():
    with pytest.raises(MoecError) as err:
        cuda_grouped_gemm("fixed", 4, N, K, E, GS, run_layout=True)
    assert "\n" not in str(err.value)
