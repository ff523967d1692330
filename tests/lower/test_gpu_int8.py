"""CUDA GEMVs with int8 activations (``schedules/cuda_gemv_int8.py``) and the run layout of nested segments
(``kernels/cuda_layout.py``): numerics of the bodies with serial loops on the CPU against
``dequantize(W) @ dequantized_activations(x)`` (what the CPU int8 kernels compute), the CUDA code they
generate, and the GPU emitter's decode graph with them."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
import tvm

from moec.core.errors import MoecError
from moec.core.formats import get_nested_format
from moec.lower.cuda_kernels import find_nvcc
from moec.lower.kernels.activations import dequantized_activations
from moec.lower.kernels.cuda_layout import RUN, from_run_layout, to_run_layout
from moec.lower.schedules.cuda_gemv import cuda_fixed_gemv, cuda_nested_gemv
from moec.lower.schedules.cuda_gemv_int8 import ROUND, dp4a
from moec.quant.nested import dequantize_nested, nest
from moec.quant.pack import unpack
from moec.quant.packed_model import pack_weight

from kernel_helpers import call, prefill_and_steps

pytestmark = pytest.mark.tvm

N, GS, E, TOP_K, IDS = 64, 64, 4, 3, [3, 0, 1]


def _close(got, want):
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * float(np.abs(want).max()))


def _llvm(func):
    return tvm.compile(tvm.IRModule({"g": func}), target="llvm")


def test_run_layout_puts_each_code_part_at_its_byte():
    """Code ``4 i + m`` of a run: word ``i // (8 / b)``, bits ``8 m + b (i mod 8 / b)``; the inverse restores
    the LSB-first segment; shapes other than whole runs of 1/2/4-bit parts are refused."""
    rng = np.random.default_rng(0)
    k = 2 * RUN
    for b in (1, 2, 4):
        seg = rng.integers(0, 256, (3, 5, k * b // 8), dtype=np.uint8)
        laid = to_run_layout(seg, b, k)
        assert laid.shape == seg.shape and laid.dtype == np.uint8
        np.testing.assert_array_equal(from_run_layout(laid, b, k), seg)
        codes = unpack(seg.reshape(-1, seg.shape[-1]), b, k).reshape(3, 5, k // RUN, RUN)
        words = laid.reshape(3, 5, k // RUN, b * 4).view("<u4")
        per = 8 // b
        for i in range(RUN // 4):
            for m in range(4):
                got = (words[..., i // per] >> np.uint32(8 * m + b * (i % per))) & np.uint32((1 << b) - 1)
                np.testing.assert_array_equal(got, codes[..., 4 * i + m])
    seg = rng.integers(0, 256, (3, 5, k * 3 // 8), dtype=np.uint8)  # fixed 3-bit codes: high parts, then low bits
    laid = to_run_layout(seg, 3, k)
    np.testing.assert_array_equal(from_run_layout(laid, 3, k), seg)
    codes = unpack(seg.reshape(-1, seg.shape[-1]), 3, k).reshape(3, 5, k // RUN, RUN)
    words = laid.reshape(3, 5, k // RUN, 12).view("<u4")
    for i in range(RUN // 4):
        for m in range(4):
            high = (words[..., i // 4] >> np.uint32(8 * m + 2 * (i % 4))) & np.uint32(3)
            low = (words[..., 2] >> np.uint32(8 * m + i)) & np.uint32(1)
            np.testing.assert_array_equal(2 * high + low, codes[..., 4 * i + m])
    with pytest.raises(MoecError, match="run layout"):
        to_run_layout(np.zeros((2, 6), np.uint8), 3, 16)
    with pytest.raises(MoecError, match="run layout"):
        to_run_layout(np.zeros((2, 64), np.uint8), 8, 64)


def test_serial_dp4a_multiplies_signed_bytes():
    """The bodies' CPU ``dp4a`` (CUDA's ``__dp4a`` of signed bytes) over words with every byte sign."""
    from tvm.script import tirx as T
    rng = np.random.default_rng(1)
    a, b, c = (rng.integers(-2**31, 2**31, 4096, dtype=np.int64).astype(np.int32) for _ in range(3))

    @T.prim_func
    def f(x: T.Buffer((4096,), "int32"), y: T.Buffer((4096,), "int32"), z: T.Buffer((4096,), "int32"),
          out: T.Buffer((4096,), "int32")):
        for i in range(4096):
            out[i] = dp4a(x[i], y[i], z[i], False)
    args = [tvm.runtime.tensor(v) for v in (a, b, c, np.zeros(4096, np.int32))]
    _llvm(f.with_attr("global_symbol", "g"))["g"](*args)
    want = c.astype(np.int64) + (a.view(np.int8).reshape(-1, 4).astype(np.int64)
                                 * b.view(np.int8).reshape(-1, 4)).sum(axis=1)
    np.testing.assert_array_equal(args[3].numpy(), want.astype(np.int32))


def test_round_constant_rounds_to_even_in_the_low_byte():
    """``x + 1.5·2**23`` (float32) rounds ``x`` to an integer, ties to even, and its bits less ``ROUND``'s are
    that integer (the low byte the int8 code) for every |x| <= 127."""
    x = np.concatenate([np.arange(-127, 127.01, 0.25), [-0.5, 0.5, 1.5, 2.5, -2.5]]).astype(np.float32)
    bits = (x + np.float32(ROUND)).view(np.int32) - np.float32(ROUND).view(np.int32)
    np.testing.assert_array_equal(bits, np.round(x).astype(np.int32))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("xr, vector, tiles", [(1, None, None), (3, None, 2), (1, 16, 4), (3, 8, 1)])
def test_int8_fixed_gemv_matches_the_dequantized_weights(bits, xr, vector, tiles):
    """Every fixed width, runs of 32 (default), 16 and 8 where the width takes them, one to four row tiles a
    block, shared and per-expert activations (3 bits in runs of 32 also from the run layout): the int8 CPU
    kernels' numerics."""
    if bits == 3 and vector == 8:  # 3 bytes a run: the 3-bit codes' words need whole 24-bit chunks of 8
        vector = 16
    k = 1024
    rng = np.random.default_rng(bits)
    pws = [pack_weight((rng.standard_normal((N, k)) * 0.1).astype(np.float32), bits, GS) for _ in range(E)]
    laid = bits == 3 and vector is None
    mod = _llvm(cuda_fixed_gemv(bits, N, k, E, TOP_K, GS, xr, vector=vector, tiles=tiles, bind=False,
                                activations="int8", run_layout=laid))
    x = rng.standard_normal((xr, k)).astype(np.float32)
    stack = [np.stack([getattr(p, a) for p in pws]) for a in ("packed", "scale", "zero")]
    if laid:
        stack[0] = to_run_layout(stack[0], 3, k)
    y = call(mod, "expert_dequant_gemv", [x, *stack, np.asarray(IDS, np.int32), np.zeros((TOP_K, N), np.float32)])
    xd = dequantized_activations(x, GS)
    for r, e in enumerate(IDS):
        _close(y[r], pws[e].dequantize() @ xd[r if xr > 1 else 0])


def _nested(storage: int, k: int):
    rng = np.random.default_rng(storage)
    return [nest(pack_weight((rng.standard_normal((N, k)) * 0.1).astype(np.float32), storage, GS)) for _ in range(E)]


@pytest.mark.parametrize("storage", [8, 4])
@pytest.mark.parametrize("run_layout, vector, xr", [(True, None, 1), (True, None, 3), (False, 16, 1), (False, 8, 3)])
def test_int8_nested_gemv_matches_the_derived_weights(storage, run_layout, vector, xr):
    """Each expert at its own width, codes from the run layout (two instructions a segment) or from moec's
    layout (even/odd words): the derived weights times the int8 activations."""
    k = 1024
    nws = _nested(storage, k)
    fmt = get_nested_format(storage)
    mod = _llvm(cuda_nested_gemv(storage, N, k, E, TOP_K, GS, xr, vector=vector, bind=False, activations="int8",
                                 run_layout=run_layout))
    segs = [np.stack([nw.segments[s] for nw in nws]) for s in range(len(fmt.segment_bits))]
    if run_layout:
        segs = [to_run_layout(a, b, k) for a, b in zip(segs, fmt.segment_bits)]
    stack = [np.stack([getattr(nw, a) for nw in nws]) for a in ("scale", "zero")]
    x = np.random.default_rng(5).standard_normal((xr, k)).astype(np.float32)
    xd = dequantized_activations(x, GS)
    widths = fmt.derived_bits
    for prec in ([widths[i % len(widths)] for i in range(E)], [widths[-1 - i % 2] for i in range(E)]):
        y = call(mod, "expert_nested_gemv", [x, *segs, *stack, np.asarray(prec, np.int32), np.asarray(IDS, np.int32),
                                             np.zeros((TOP_K, N), np.float32)])
        for r, e in enumerate(IDS):
            _close(y[r], dequantize_nested(nws[e], prec[e]) @ xd[r if xr > 1 else 0])


def _silu(v):
    return v / (1 + np.exp(-v))


def test_int8_swiglu_bodies_match_gate_times_up():
    """Gate and up in one call, fixed (4-bit) and nested (8-bit storage, run layout): ``silu(g x) · (u x)``
    over the int8 activations."""
    k = 1024
    x = np.random.default_rng(7).standard_normal((1, k)).astype(np.float32)
    xd = dequantized_activations(x, GS)[0]
    rng = np.random.default_rng(4)
    gate, up = ([pack_weight((rng.standard_normal((N, k)) * 0.1).astype(np.float32), 4, GS) for _ in range(E)]
                for _ in range(2))
    mod = _llvm(cuda_fixed_gemv(4, N, k, E, TOP_K, GS, 1, swiglu=True, bind=False, activations="int8"))
    arrays = [np.stack([getattr(p, a) for p in ws]) for ws in (gate, up) for a in ("packed", "scale", "zero")]
    y = call(mod, "expert_dequant_swiglu", [x, *arrays, np.asarray(IDS, np.int32), np.zeros((TOP_K, N), np.float32)])
    for r, e in enumerate(IDS):
        _close(y[r], _silu(gate[e].dequantize() @ xd) * (up[e].dequantize() @ xd))
    fmt = get_nested_format(8)
    gn, un = _nested(8, k), [nest(p) for p in (pack_weight(w.dequantize(), 8, GS) for w in gate)]
    mod = _llvm(cuda_nested_gemv(8, N, k, E, TOP_K, GS, 1, swiglu=True, bind=False, activations="int8",
                                 run_layout=True))
    stacks = []
    for nws in (gn, un):
        stacks += [to_run_layout(np.stack([nw.segments[s] for nw in nws]), b, k)
                   for s, b in enumerate(fmt.segment_bits)]
        stacks += [np.stack([getattr(nw, a) for nw in nws]) for a in ("scale", "zero")]
    prec = np.asarray([2, 3, 4, 8], np.int32)
    y = call(mod, "expert_nested_swiglu", [x, *stacks, prec, np.asarray(IDS, np.int32),
                                           np.zeros((TOP_K, N), np.float32)])
    for r, e in enumerate(IDS):
        _close(y[r], _silu(dequantize_nested(gn[e], prec[e]) @ xd) * (dequantize_nested(un[e], prec[e]) @ xd))


def test_int8_bodies_generate_cuda_with_dp4a_and_shared_activations():
    """Bound to threads, the int8 bodies are CUDA C with ``__dp4a`` and the activation row in shared memory (and,
    where nvcc is installed, compile for a Jetson Orin's sm_87)."""
    func = cuda_nested_gemv(8, 256, 1024, E, TOP_K, GS, 1, activations="int8", run_layout=True)
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_87"}, host="llvm")
    lib = tvm.compile(tvm.IRModule({"g": func}), target=target)
    src = lib.mod.imports[0].inspect_source()
    assert "__dp4a" in src and "__shared__" in src and "__syncthreads" in src
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("no nvcc")
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        open(f"{d}/k.cu", "w").write(src)
        res = subprocess.run([nvcc, "-cubin", "-arch=sm_87", "-o", f"{d}/k.cubin", f"{d}/k.cu"], capture_output=True,
                             text=True)
        assert res.returncode == 0, res.stderr[-2000:]


def test_int8_bodies_refuse_what_they_do_not_take():
    """A run layout is read in runs of 32 by the nested int8 bodies only; float32 takes neither it nor tiles."""
    with pytest.raises(MoecError, match="run layout"):
        cuda_nested_gemv(8, N, 512, E, TOP_K, GS, 1, activations="int8", run_layout=True, bind=False)
    with pytest.raises(MoecError, match="run layout"):
        cuda_fixed_gemv(4, N, 1024, E, TOP_K, GS, 1, activations="int8", run_layout=True, bind=False)
    with pytest.raises(MoecError, match="float32 or int8"):
        cuda_nested_gemv(8, N, 1024, E, TOP_K, GS, 1, run_layout=True, bind=False)
    with pytest.raises(MoecError, match="float32 or int8"):
        cuda_fixed_gemv(4, N, 1024, E, TOP_K, GS, 1, activations="fp8", bind=False)


@pytest.fixture(scope="module")
def wide_nested(tmp_path_factory):
    """A tiny model whose hidden size and expert width (1024) the int8 bodies read in runs of 32."""
    from moec.core.run_plan import storage_plan
    from moec.lower.params import build_nested_params, build_params
    from moec.models.checkpoint import load_checkpoint
    from moec.quant.weights import ModelWeights
    from tests.conftest import make_tiny_checkpoint
    from tests.runtime.nested_fixtures import mixed_plan
    root = tmp_path_factory.mktemp("gpu-int8")
    make_tiny_checkpoint(root / "ckpt", seed=5, hidden_size=1024, expert_intermediate=1024, num_layers=1,
                         num_heads=8, num_kv_heads=4)
    model = load_checkpoint(root / "ckpt")
    plan = mixed_plan(model.cfg)
    weights = ModelWeights.from_model(model, storage_plan(plan, 8))
    fixed = ModelWeights.from_model(model, plan)  # the same plan, compiled fixed-width (stacks per bit class)
    return (model.cfg, build_nested_params(model.cfg, plan, weights.packed, weights.floats, 8), root,
            build_params(model.cfg, plan, fixed.packed, fixed.floats))


def _decode(cfg, params, emitter, path):
    from moec.lower.backends.base import Backend
    from moec.lower.kernel_linear import apply_kernel_layout
    from moec.lower.library import build_module
    from moec.lower.pipeline import CPU_PHASES
    params = copy.deepcopy(params)
    laid = apply_kernel_layout(params, emitter)
    unscheduled = Backend("unscheduled", tuple(p for p in CPU_PHASES if p[0] != "schedule"))
    build_module(cfg, params, tvm.target.Target({"kind": "llvm"}), unscheduled, path, emitter=emitter)
    vm = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())
    args = [tvm.runtime.tensor(a, tvm.cpu()) for _, a in params.flat()]
    tokens = [5, 17, 42]
    cache = [tvm.runtime.tensor(np.zeros((cfg.num_kv_heads, len(tokens), cfg.head_dim), np.float32))
             for _ in range(2 * cfg.num_layers)]
    for pos, t in enumerate(tokens):
        res = vm["decode"](tvm.runtime.tensor(np.array([t], np.int32)), tvm.runtime.tensor(np.array([pos], np.int64)),
                           *cache, *args)
    return laid, params, res[0].numpy()[0]


def test_gpu_emitter_int8_decodes_a_nested_plan_close_to_float32(wide_nested):
    """The GPU emitter with int8 activations lays the nested stacks out in runs (and only them; the entry still
    gives back its NestedWeights), and its decode graph (the int8 bodies' serial loops) stays within the
    int8-activation error of the float32 graph's logits, and differs from them."""
    from moec.lower.gpu_linear import GpuLinearEmitter
    from moec.lower.params import CUDA_RUNS
    cfg, params, root, _ = wide_nested
    emitter = GpuLinearEmitter("serial", activations="int8")
    laid, int8_params, fast = _decode(cfg, params, emitter, root / "i8.so")
    assert emitter.resolved_activations == "int8"  # what the manifest records
    stacks = [n for n, e in params.entries.items() if e.nested]
    assert laid == len(stacks) > 0
    for name in stacks:
        entry = int8_params.entries[name]
        assert entry.layout == CUDA_RUNS
        assert not np.array_equal(entry.arrays["seg1"], params.entries[name].arrays["seg1"])
        for a, b in zip(entry.nested_weights(), params.entries[name].nested_weights()):
            for s, t in zip(a.segments, b.segments):
                np.testing.assert_array_equal(s, t)
    assert all(not e.layout for n, e in int8_params.entries.items() if not e.nested)
    laid, _, exact = _decode(cfg, params, GpuLinearEmitter("serial"), root / "f32.so")
    assert laid == 0
    assert 0 < np.abs(fast - exact).max() <= 0.05 * np.abs(exact).max()


def test_gpu_emitter_int8_decodes_a_fixed_plan_close_to_float32(wide_nested):
    """The same plan compiled fixed-width (2/3/4/8-bit stacks, gate and up in one SwiGLU call each): only the
    3-bit stacks are laid out in runs (and still give back their PackedWeights), and the int8 graph stays within
    the int8-activation error of the float32 one."""
    from moec.lower.gpu_linear import GpuLinearEmitter
    from moec.lower.params import CUDA_RUNS
    cfg, _, root, params = wide_nested
    laid, int8_params, fast = _decode(cfg, params, GpuLinearEmitter("serial", activations="int8"), root / "fi8.so")
    threes = [n for n, e in params.entries.items() if ".experts." in n and e.bits == 3]
    assert laid == len(threes) > 0
    for name, entry in int8_params.entries.items():
        assert (entry.layout == CUDA_RUNS) == (name in threes)
        if name in threes:
            for a, b in zip(entry.packed_weights(), params.entries[name].packed_weights()):
                np.testing.assert_array_equal(a.packed, b.packed)
    _, _, exact = _decode(cfg, params, GpuLinearEmitter("serial"), root / "ff32.so")
    assert 0 < np.abs(fast - exact).max() <= 0.05 * np.abs(exact).max()


def test_int8_request_the_shapes_do_not_take_resolves_to_float32(tmp_path):
    """A model too small for the int8 bodies (k = 64: no run of 8 on 32 lanes) decodes with the float32 forms,
    and the emitter (the manifest) says float32, not the int8 that was asked for."""
    from moec.lower.decode_graph import DecodeBuilder
    from moec.lower.gpu_linear import GpuLinearEmitter
    from moec.lower.params import build_params
    from moec.models.checkpoint import load_checkpoint
    from moec.quant.weights import ModelWeights
    from moec.core.plan import resolve_plan
    from tests.conftest import make_tiny_checkpoint
    make_tiny_checkpoint(tmp_path / "ckpt")
    model = load_checkpoint(tmp_path / "ckpt")
    plan = resolve_plan("uniform:4", model.cfg, 32)
    weights = ModelWeights.from_model(model, plan)
    emitter = GpuLinearEmitter("serial", activations="int8")
    DecodeBuilder(model.cfg, build_params(model.cfg, plan, weights.packed, weights.floats), emitter).build()
    assert emitter.seen <= {"float32"} and emitter.resolved_activations == "float32"


def test_cuda_backend_takes_int8_activations():
    """``--activations int8`` on a CUDA target: the GPU emitter's int8 bodies; auto stays float32 (not yet timed)."""
    from moec.core.targets import load_target
    from moec.lower.backends import BACKENDS
    target = load_target("jetson-orin-nano").tvm()
    assert BACKENDS["cuda"].emitter(target, "int8").activations == "int8"
    assert BACKENDS["cuda"].emitter(target).activations == "float32"


@pytest.mark.skipif(find_nvcc() is None or shutil.which("aarch64-linux-gnu-g++") is None,
                    reason="needs nvcc and g++-aarch64-linux-gnu")
def test_moec_compile_int8_nested_for_jetson(tmp_path):
    """``moec compile --target jetson-agx-orin --nested 8 --activations int8`` builds a CUDA bundle whose manifest
    says int8, its kernels the int8 bodies (nvcc compiled them for sm_87)."""
    import json

    from click.testing import CliRunner

    from moec.cli.main import cli
    from tests.conftest import make_tiny_checkpoint
    make_tiny_checkpoint(tmp_path / "ckpt", hidden_size=256, expert_intermediate=256)
    res = CliRunner().invoke(cli, ["compile", str(tmp_path / "ckpt"), "--target", "jetson-agx-orin",
                                   "--plan", "uniform:4", "--nested", "8",
                                   "--activations", "int8", "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["activations"] == "int8" and manifest["nested"]["storage_bits"] == 8
    assert "__dp4a" in (tmp_path / "b" / "kernels.cu").read_text()
    res = CliRunner().invoke(cli, ["inspect", str(tmp_path / "b")])
    assert res.exit_code == 0 and "kernels: gpu-fused, int8 activations" in res.output, res.output


@pytest.mark.skipif(find_nvcc() is None or shutil.which("aarch64-linux-gnu-g++") is None,
                    reason="needs nvcc and g++-aarch64-linux-gnu")
def test_streamed_int8_nested_cuda_bundle_has_the_whole_models_weights(tmp_path, monkeypatch):
    """A model over the memory budget streams layer by layer: its CUDA nested int8 bundle stores the same
    (run-layout) weights as the whole-model compile (the streaming packer asks the emitter's ``relayout`` too)."""
    import json

    import moec.models.memory_budget as budget
    from moec import api
    from tests.conftest import make_tiny_checkpoint
    make_tiny_checkpoint(tmp_path / "ckpt", hidden_size=1024, expert_intermediate=1024, num_layers=1, num_heads=8,
                         num_kv_heads=4)
    out = {}
    for limit, name in ((0, "streamed"), (1 << 40, "whole")):
        monkeypatch.setattr(budget, "WHOLE_MODEL_LIMIT", limit)
        out[name] = api.compile_bundle(api.CompileConfig(tmp_path / "ckpt", tmp_path / name, plan="uniform:4",
                                                         target="jetson-agx-orin", nested=8, activations="int8"))
    tensors = {n: {t: (v["dtype"], v["shape"], v["sha256"]) for t, v in json.loads(
        (p / "weights.json").read_text())["tensors"].items()} for n, p in out.items()}  # offsets differ: order
    assert json.loads((out["streamed"] / "manifest.json").read_text())["streamed"]
    assert tensors["streamed"] == tensors["whole"] and "layers.0.experts.nested.w1.seg3" in tensors["whole"]


@pytest.mark.parametrize("stacks", ["nested", "fixed"])
def test_int8_prefill_matches_int8_decode_steps(wide_nested, stacks):
    """With int8 activations the prefill's GEMMs see each row rounded as the int8 decode GEMVs round it (and read the
    run layout the nested and 3-bit stacks are stored in): a prompt prefilled in two chunks gives its int8 decode
    steps' logits, which differ from the float32 ones."""
    from moec.lower.gpu_linear import GpuLinearEmitter
    cfg, nested, root, fixed = wide_nested
    params = nested if stacks == "nested" else fixed
    tokens = [5, 17, 42, 7, 99, 3]
    emitter = GpuLinearEmitter("serial", activations="int8")
    prefill, steps = prefill_and_steps(cfg, params, emitter, root / f"p-{stacks}.so", tokens, split=4)
    assert emitter.int8_names and any(".experts." in n for n in emitter.int8_names)
    np.testing.assert_allclose(prefill, steps, rtol=1e-4, atol=1e-4 * float(np.abs(steps).max()))
    _, exact = prefill_and_steps(cfg, params, GpuLinearEmitter("serial"), root / f"f-{stacks}.so", tokens, split=4)
    assert np.abs(steps - exact).max() > 1e-3 * np.abs(exact).max()  # int8 rounding is there to be matched
