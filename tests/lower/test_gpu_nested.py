"""The CUDA nested GEMV (``gpu_linear.expert_nested_gemv``): numerics of its TIR on the CPU against the
derived weights (numpy), and CUDA code generation that reads a segment only under its width test."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import tvm
from tvm import te

from moec.core.formats import get_nested_format
from moec.core.targets import load_target
from moec.lower.cuda_kernels import find_nvcc
from moec.lower.gpu_linear import expert_nested_gemv
from moec.lower.schedules.gpu_rules import FusedGemv
from moec.quant.nested import dequantize_nested, nest
from moec.quant.packed_model import pack_weight

from kernel_helpers import assert_close, call

pytestmark = pytest.mark.tvm

N, K, GS, E, TOP_K = 64, 128, 32, 4, 3


def _func(storage: int, per_expert: bool) -> tvm.tirx.PrimFunc:
    nws = _experts(storage)
    segs = [te.placeholder((E, *s.shape), "uint8", f"seg{i}") for i, s in enumerate(nws[0].segments)]
    scale = te.placeholder((E, *nws[0].scale.shape), "float16", "scale")
    zero = te.placeholder((E, *nws[0].zero.shape), "uint8", "zero")
    prec, ids = te.placeholder((E,), "int32", "prec"), te.placeholder((TOP_K,), "int32", "ids")
    x = te.placeholder((TOP_K if per_expert else 1, K), "float32", "x")
    y = expert_nested_gemv(x, *segs, scale, zero, prec, ids, storage_bits=storage, n=N, k=K, group=GS)
    return te.create_prim_func([x, *segs, scale, zero, prec, ids, y]).with_attr("global_symbol", "nested")


def _experts(storage: int):
    rng = np.random.default_rng(storage)
    return [nest(pack_weight((rng.standard_normal((N, K)) * 0.1).astype(np.float32), storage, GS))
            for _ in range(E)]


@pytest.mark.parametrize("storage,per_expert", [(8, False), (4, True)])
def test_nested_gemv_tir_matches_the_derived_weights(storage, per_expert):
    """The same TIR the CUDA backend schedules, compiled for the CPU: every expert at its own width."""
    nws = _experts(storage)
    mod = tvm.compile(tvm.IRModule({"nested": _func(storage, per_expert)}), target="llvm")
    x = np.random.default_rng(1).standard_normal((TOP_K if per_expert else 1, K)).astype(np.float32)
    widths = get_nested_format(storage).derived_bits
    stack = [np.stack([getattr(nw, a) for nw in nws]) for a in ("scale", "zero")]
    segs = [np.stack([nw.segments[s] for nw in nws]) for s in range(len(widths))]
    for prec in ([widths[e % len(widths)] for e in range(E)], [widths[-1 - e % 2] for e in range(E)]):
        ids = [3, 0, 1]
        y = call(mod, "nested", [x, *segs, *stack, np.asarray(prec, np.int32), np.asarray(ids, np.int32),
                                 np.zeros((TOP_K, N), np.float32)])
        for r, e in enumerate(ids):
            assert_close(y[r], dequantize_nested(nws[e], prec[e]) @ x[r if per_expert else 0])


def test_cuda_nested_gemv_loads_each_plane_only_under_its_width():
    """Scheduled by moec's GPU rule for the Jetson preset and generated as CUDA C (no GPU, no nvcc):
    the width table is read, the top segment unconditionally, every lower segment only inside
    ``if (w <= prec[expert])`` for the width ``w`` that first needs it."""
    target = load_target("jetson-agx-orin").tvm()
    with target:
        sch = FusedGemv().apply(_func(8, False), target, False)
        assert sch is not None
        ex = tvm.compile(tvm.IRModule({"nested": sch.mod["main"]}), target=target)
    from moec.lower.cuda_kernels import cuda_source
    src = cuda_source(ex.mod)
    assert src is not None and "threadIdx.x" in src and "prec_ptr[ids_ptr[" in src
    lines = [ln.strip() for ln in src.splitlines() if ln.strip()]
    fmt = get_nested_format(8)
    for s, need in enumerate(fmt.derived_bits):
        loads = [i for i, ln in enumerate(lines) if f"seg{s}_ptr[" in ln and "__global__" not in ln]
        assert loads, s
        for i in loads:
            guarded = re.match(rf"if \({need} <= prec_ptr\[ids_ptr\[", lines[i - 1]) is not None
            assert guarded == (s > 0), (s, lines[i - 1])


@pytest.fixture(scope="module")
def nested_params(tmp_path_factory):
    from moec.core.run_plan import storage_plan
    from moec.lower.params import build_nested_params
    from moec.models.checkpoint import load_checkpoint
    from moec.quant.weights import ModelWeights
    from tests.conftest import make_tiny_checkpoint
    from tests.runtime.nested_fixtures import mixed_plan
    root = tmp_path_factory.mktemp("gpu-nested")
    make_tiny_checkpoint(root / "ckpt", seed=3, hidden_size=256, expert_intermediate=256)  # the hand kernel's k
    model = load_checkpoint(root / "ckpt")
    plan = mixed_plan(model.cfg)  # experts at 2/3/4/8 bits from 8-bit storage, other weights 8-bit
    weights = ModelWeights.from_model(model, storage_plan(plan, 8))
    return model.cfg, plan, build_nested_params(model.cfg, plan, weights.packed, weights.floats, 8), root


@pytest.mark.parametrize("kernel", ["serial", "te"])
def test_gpu_emitter_decodes_a_nested_plan_as_the_derived_torch_model(nested_params, kernel):
    """The GPU emitter's nested decode graph (its TIR unscheduled, run on the CPU; the hand-written kernel's
    bodies with serial loops, or the TE form) under the plan at load gives the logits of the torch model
    with each expert's derived weights; with the hand kernels, so does its prefill of the whole prompt."""
    import torch

    from moec.lower.backends.base import Backend
    from moec.lower.gpu_linear import GpuLinearEmitter
    from moec.lower.library import build_module
    from moec.lower.pipeline import CPU_PHASES
    from tests.runtime.nested_fixtures import derived_model
    cfg, plan, params, root = nested_params
    if kernel == "serial":  # gate and up in one SwiGLU call of the hand kernel
        import copy

        from moec.lower.decode_graph import DecodeBuilder
        mod = DecodeBuilder(cfg, copy.deepcopy(params), GpuLinearEmitter(expert_kernel=kernel)).build()
        assert any(gv.name_hint.startswith("expert_nested_swiglu") for gv in mod.functions), list(mod.functions)
    unscheduled = Backend("unscheduled", tuple(p for p in CPU_PHASES if p[0] != "schedule"))
    build_module(cfg, params, tvm.target.Target({"kind": "llvm"}), unscheduled, root / "gpu.so",
                 emitter=GpuLinearEmitter(expert_kernel=kernel))
    vm = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(str(root / "gpu.so")), tvm.cpu())
    args = [tvm.runtime.tensor(a, tvm.cpu()) for _, a in params.flat()]
    tokens = [5, 17, 42, 7]
    cache = [tvm.runtime.tensor(np.zeros((cfg.num_kv_heads, len(tokens), cfg.head_dim), np.float32))
             for _ in range(2 * cfg.num_layers)]
    for pos, t in enumerate(tokens):  # each call writes row pos of the caches in place
        res = vm["decode"](tvm.runtime.tensor(np.array([t], np.int32)),
                           tvm.runtime.tensor(np.array([pos], np.int64)), *cache, *args)
    want = derived_model(root / "ckpt", plan)(torch.tensor([tokens]))[0, -1].detach().numpy()
    np.testing.assert_allclose(res[0].numpy()[0], want, atol=2e-4 * float(np.abs(want).max()))
    if kernel == "serial":  # the prompt in one prefill call (the nested grouped GEMM at each expert's width)
        cache = [tvm.runtime.tensor(np.zeros((cfg.num_kv_heads, len(tokens), cfg.head_dim), np.float32))
                 for _ in range(2 * cfg.num_layers)]
        res = vm["prefill"](tvm.runtime.tensor(np.array(tokens, np.int32)), tvm.runtime.tensor(np.array([0], np.int64)),
                            *cache, *args)
        np.testing.assert_allclose(res[0].numpy()[0], want, atol=2e-4 * float(np.abs(want).max()))


def test_nested_decode_generates_cuda_for_jetson(nested_params):
    """``moec compile --target jetson-agx-orin --nested`` no longer refused: the decode graph of a nested
    stack generates CUDA C whose expert kernels read the width table (code generation only)."""
    from tvm import relax

    from moec.lower.backends import backend_for
    from moec.lower.cuda_kernels import count_kernels, cuda_source
    from moec.lower.bundler import preset_has_nested_kernels
    from moec.lower.decode_graph import DecodeBuilder
    from moec.lower.pipeline import make_pipeline
    from moec.lower.resident import add_resident_entries
    cfg, _, params, _ = nested_params
    preset = load_target("jetson-agx-orin")
    assert preset_has_nested_kernels(preset)
    bb = relax.BlockBuilder()
    DecodeBuilder(cfg, params, backend_for(preset).emitter(preset.tvm(), "float32")).build(bb)
    add_resident_entries(bb)
    target = preset.tvm()
    with target:
        ex = tvm.compile(bb.get(), target=target, relax_pipeline=make_pipeline(backend_for(preset).phases))
    src = cuda_source(ex.mod)
    assert src is not None and count_kernels(src) > 10
    with target:  # runs of kernels with static arguments are lifted for CUDA-graph capture
        lowered = make_pipeline(backend_for(preset).phases)(bb.get())
    names = [gv.name_hint for gv in lowered.functions]  # the resident entry calls decode, whose runs replay
    assert "decode_resident" in names and any(n.startswith("decode_cuda_graph_capture") for n in names)
    plain = preset.model_copy(update={"cuda_graphs": False})  # a preset file's off switch: every kernel launched
    assert not backend_for(plain).cuda_graphs and backend_for(plain).manifest()["cuda_graphs"] is False
    with target:
        lowered = make_pipeline(backend_for(plain).phases)(bb.get())
    assert not any(gv.name_hint.startswith("decode_cuda_graph_capture") for gv in lowered.functions)
    assert "expert_nested_gemv" in src and "__shfl_down_sync" in src
    assert re.search(r"if \(prec_ptr\[ids_ptr\[[^\]]*\]\] == 2\)", src)  # the hand kernel's width branch


@pytest.mark.skipif(find_nvcc() is None or shutil.which("aarch64-linux-gnu-g++") is None,
                    reason="needs nvcc and g++-aarch64-linux-gnu")
def test_moec_compile_nested_for_jetson(tmp_path):
    """``moec compile --target jetson-agx-orin --nested 8`` writes a CUDA bundle (nvcc fatbin for sm_87)."""
    from tests.conftest import compile_tiny_bundle
    out, manifest = compile_tiny_bundle(tmp_path, "--target", "jetson-agx-orin", "--plan", "uniform:4", "--nested", "8",
                                        seed=2)
    assert manifest["nested"] == {"storage_bits": 8} and manifest["cuda"]["arch"] == "sm_87"
    src = (out / "kernels.cu").read_text()
    assert "expert_nested_gemv" in src and re.search(r"if \(8 <= layers_\d+_experts_prec_ptr\[", src)


#: (run length, warps a block, rows a warp, magic-number conversion, codes by words) of the hand kernels
VARIANTS = [(8, 4, None, False, True), (8, 4, 1, False, False), (16, 2, 2, True, True), (8, 1, 4, True, False)]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("storage, xr", [(8, 1), (8, 3), (4, 1), (4, 3)])
def test_hand_nested_gemv_matches_the_derived_weights(storage, xr, variant):
    """``schedules/cuda_gemv.py`` with serial loops on the CPU: one body per width, codes in the width's
    units (per weight or eight at a time from words) and the group's affine terms once per run give the
    derived weights' GEMV at every width, for each rows-a-warp, run length and conversion."""
    from moec.lower.schedules.cuda_gemv import cuda_nested_gemv
    n, k, gs, e, top_k = 64, 512, 64, 4, 3
    vector, rows, per_warp, magic, words = variant
    rng = np.random.default_rng(storage)
    nws = [nest(pack_weight((rng.standard_normal((n, k)) * 0.1).astype(np.float32), storage, gs)) for _ in range(e)]
    func = cuda_nested_gemv(storage, n, k, e, top_k, gs, xr, vector=vector, rows=rows, per_warp=per_warp,
                            magic=magic, words=words, bind=False)
    mod = tvm.compile(tvm.IRModule({"g": func}), target="llvm")
    widths = get_nested_format(storage).derived_bits
    x = rng.standard_normal((xr, k)).astype(np.float32)
    segs = [np.stack([nw.segments[s] for nw in nws]) for s in range(len(widths))]
    stack = [np.stack([getattr(nw, a) for nw in nws]) for a in ("scale", "zero")]
    for prec in ([widths[i % len(widths)] for i in range(e)], [widths[-1 - i % 2] for i in range(e)]):
        ids = [3, 0, 1]
        y = call(mod, "expert_nested_gemv", [x, *segs, *stack, np.asarray(prec, np.int32), np.asarray(ids, np.int32),
                                             np.zeros((top_k, n), np.float32)])
        for r, ex in enumerate(ids):
            assert_close(y[r], dequantize_nested(nws[ex], prec[ex]) @ x[r if xr > 1 else 0])


@pytest.mark.parametrize("variant", VARIANTS[:3])
@pytest.mark.parametrize("bits, xr", [(2, 1), (3, 3), (4, 1), (8, 3)])
def test_hand_fixed_gemv_matches_the_dequantized_weights(bits, xr, variant):
    """The same bodies over a fixed-width stack (one segment; 3-bit codes straddle bytes) give
    ``dequantize(W) @ x`` for each routed row."""
    from moec.lower.schedules.cuda_gemv import cuda_fixed_gemv
    n, k, gs, e, top_k = 64, 512, 64, 4, 3
    vector, rows, per_warp, magic, _ = variant
    rng = np.random.default_rng(bits)
    pws = [pack_weight((rng.standard_normal((n, k)) * 0.1).astype(np.float32), bits, gs) for _ in range(e)]
    func = cuda_fixed_gemv(bits, n, k, e, top_k, gs, xr, vector=vector, rows=rows, per_warp=per_warp, magic=magic,
                           bind=False)
    mod = tvm.compile(tvm.IRModule({"g": func}), target="llvm")
    x = rng.standard_normal((xr, k)).astype(np.float32)
    ids = [3, 0, 1]
    y = call(mod, "expert_dequant_gemv", [x, *[np.stack([getattr(p, a) for p in pws]) for a in ("packed", "scale", "zero")],
                                          np.asarray(ids, np.int32), np.zeros((top_k, n), np.float32)])
    for r, ex in enumerate(ids):
        assert_close(y[r], pws[ex].dequantize() @ x[r if xr > 1 else 0])


def _silu(v):
    return v / (1 + np.exp(-v))


@pytest.mark.parametrize("storage", [8, 4])
def test_hand_nested_swiglu_matches_the_derived_weights(storage):
    """The SwiGLU form (gate and up stacks in one kernel, sharing the routed expert's width) gives
    ``silu(W_gate x) · (W_up x)`` of the derived weights at every width."""
    from moec.lower.schedules.cuda_gemv import cuda_nested_gemv
    n, k, gs, e, top_k = 64, 512, 64, 4, 3
    rng = np.random.default_rng(storage + 10)
    gate, up = ([nest(pack_weight((rng.standard_normal((n, k)) * 0.1).astype(np.float32), storage, gs))
                 for _ in range(e)] for _ in range(2))
    mod = tvm.compile(tvm.IRModule({"g": cuda_nested_gemv(storage, n, k, e, top_k, gs, 1, swiglu=True,
                                                          bind=False)}), target="llvm")
    widths = get_nested_format(storage).derived_bits

    def stack(nws):
        return [np.stack([nw.segments[s] for nw in nws]) for s in range(len(widths))] + [
            np.stack([getattr(nw, a) for nw in nws]) for a in ("scale", "zero")]
    x = rng.standard_normal((1, k)).astype(np.float32)
    prec, ids = [widths[i % len(widths)] for i in range(e)], [3, 0, 1]
    y = call(mod, "expert_nested_swiglu", [x, *stack(gate), *stack(up), np.asarray(prec, np.int32),
                                           np.asarray(ids, np.int32), np.zeros((top_k, n), np.float32)])
    for r, ex in enumerate(ids):
        want = _silu(dequantize_nested(gate[ex], prec[ex]) @ x[0]) * (dequantize_nested(up[ex], prec[ex]) @ x[0])
        assert_close(y[r], want)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_hand_fixed_swiglu_matches_the_dequantized_weights(bits):
    from moec.lower.schedules.cuda_gemv import cuda_fixed_gemv
    n, k, gs, e, top_k = 64, 512, 64, 4, 3
    rng = np.random.default_rng(bits + 20)
    gate, up = ([pack_weight((rng.standard_normal((n, k)) * 0.1).astype(np.float32), bits, gs) for _ in range(e)]
                for _ in range(2))
    mod = tvm.compile(tvm.IRModule({"g": cuda_fixed_gemv(bits, n, k, e, top_k, gs, 1, swiglu=True, bind=False)}),
                      target="llvm")
    x = rng.standard_normal((1, k)).astype(np.float32)
    ids = [3, 0, 1]
    arrays = [np.stack([getattr(p, a) for p in pws]) for pws in (gate, up) for a in ("packed", "scale", "zero")]
    y = call(mod, "expert_dequant_swiglu", [x, *arrays, np.asarray(ids, np.int32), np.zeros((top_k, n), np.float32)])
    for r, ex in enumerate(ids):
        assert_close(y[r], _silu(gate[ex].dequantize() @ x[0]) * (up[ex].dequantize() @ x[0]))


def test_hand_gemv_spreads_every_plane_value():
    """The word assembly's spread (``cuda_codes.spread``) of every 1-bit byte and 2-bit half-word, and of 4-bit words,
    puts value ``v`` in byte ``v // 2`` of the even or odd word, where the per-weight extraction reads it."""
    from tvm.script import tirx as T

    from moec.lower.schedules.cuda_codes import spread as spread_codes
    for bits, count in ((1, 256), (2, 65536), (4, 4096)):
        vals = np.arange(count, dtype=np.uint32) * np.uint32(1 if bits < 4 else 1048573)  # 4-bit: all 32 bits

        @T.prim_func
        def spread(a: T.Buffer((count,), "uint32"), lo: T.Buffer((count,), "uint32"),
                   hi: T.Buffer((count,), "uint32")):
            for i in range(count):
                lo[i] = spread_codes(a[i], bits, 0)[0]
                hi[i] = spread_codes(a[i], bits, 0)[1]
        mod = tvm.compile(tvm.IRModule({"spread": spread}), target="llvm")
        args = [tvm.runtime.tensor(a) for a in (vals, np.zeros(count, np.uint32), np.zeros(count, np.uint32))]
        mod["spread"](*args)
        words = (args[1].numpy(), args[2].numpy())
        for v in range(8):
            got = (words[v % 2] >> np.uint32(8 * (v // 2))) & np.uint32(0xFF)
            want = (vals >> np.uint32(v * bits)) & np.uint32((1 << bits) - 1)
            np.testing.assert_array_equal(got, want, err_msg=f"{bits}-bit value {v}")


def test_hand_nested_gemv_branch_reads_only_its_segments():
    """In the generated CUDA C each width's branch loads exactly the segments that width needs (the
    widest is the final else), each in one vector load where its run is 2+ bytes; lanes sum by shuffles."""
    from moec.lower.cuda_kernels import cuda_source
    from moec.lower.schedules.cuda_gemv import cuda_nested_gemv
    from moec.quant.nested import segments_for
    target = load_target("cuda:sm_90").tvm()
    with target:
        ex = tvm.compile(tvm.IRModule({"expert_nested_gemv": cuda_nested_gemv(8, 64, 512, 4, 3, 64, 1)}),
                         target=target)
    src = cuda_source(ex.mod)
    body = src[src.index('extern "C" __global__'):]
    assert "__shfl_down_sync" in body and "*(float4*)(xl_ptr" in body
    fmt = get_nested_format(8)
    starts = [m.start() for m in re.finditer(r"if \(prec_ptr\[ids_ptr\[[^\]]*\]\] == \d+\)", body)]
    assert len(starts) == len(fmt.derived_bits) - 1
    widest = body.index("} else {", starts[-1])  # the widest width's body: the final else
    bounds = [*starts, widest, body.index("__shfl_down_sync")]
    for w, a, b in zip(fmt.derived_bits, bounds, bounds[1:]):
        used = {s for s in range(4) if f"seg{s}_ptr[" in body[a:b] or f"seg{s}_ptr +" in body[a:b]}
        assert used == set(range(segments_for(fmt, w))), (w, used)
    assert "*(uchar4*)(sl_ptr" in body or "*(uint*)(sl_ptr" in body  # the 4-bit plane's 4-byte run
