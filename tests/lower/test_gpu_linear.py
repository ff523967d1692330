"""The GPU emitter's fused dequantize-GEMVs: same numbers as the reference emitter (run on the CPU here)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import tvm

from moec.lower.backends.base import Backend
from moec.lower.library import build_module
from moec.lower.gpu_linear import GpuLinearEmitter
from moec.lower.linear import LinearEmitter
from moec.lower.pipeline import CPU_PHASES, CUDA_PHASES
from moec.lower.schedules.gpu_rules import FusedGemv, binds_threads
from tests.conftest import REPO

from kernel_helpers import prefill_and_steps

pytestmark = pytest.mark.tvm


def _params(root, **dims):
    """Decode parameters of a random model (Mixtral-shaped unless ``dims`` name another architecture, built in
    memory then) under a mixed plan, through ONNX as ``moec compile`` makes them."""
    from moec.export.exporter import export_model
    from moec.lower.onnx_import import import_onnx
    from moec.lower.params import build_params
    from moec.models.checkpoint import load_checkpoint
    from tests.conftest import make_tiny_checkpoint
    from tests.lower.plan_fixtures import mixed_plan
    if "architecture" in dims:
        from tests.export.export_fixtures import random_model
        model = random_model(4, **dims)
    else:
        make_tiny_checkpoint(root / "ckpt", seed=4, **dims)
        model = load_checkpoint(root / "ckpt")
    export_model(model, mixed_plan(model.cfg), root / "onnx")  # experts at 2, 3, 4, 8 and 16 bits
    cfg, plan, packed, floats = import_onnx(root / "onnx")
    return cfg, build_params(cfg, plan, packed, floats), root


@pytest.fixture(scope="module")
def tiny_params(tmp_path_factory):
    return _params(tmp_path_factory.mktemp("gpu-linear"))


@pytest.fixture(scope="module")
def wide_params(tmp_path_factory):
    """Experts whose k (256) the hand-written expert GEMVs take."""
    return _params(tmp_path_factory.mktemp("gpu-linear-wide"), hidden_size=256, expert_intermediate=256)


def _logits(cfg, params, emitter, lib, tokens) -> np.ndarray:
    """Decode ``tokens`` with the plain CPU phases (no scheduling: the TE alone is under test)."""
    target = tvm.target.Target({"kind": "llvm"})
    unscheduled = Backend("unscheduled", tuple(p for p in CPU_PHASES if p[0] != "schedule"))
    build_module(cfg, copy.deepcopy(params), target, unscheduled, lib, emitter=emitter)
    vm = tvm.runtime.vm.VirtualMachine(tvm.runtime.load_module(str(lib)), tvm.cpu())
    dev_params = [tvm.runtime.tensor(a, tvm.cpu()) for _, a in params.flat()]
    cache = [tvm.runtime.tensor(np.zeros((cfg.num_kv_heads, len(tokens), cfg.head_dim), np.float32))
             for _ in range(2 * cfg.num_layers)]
    out = []
    for pos, t in enumerate(tokens):  # each call writes row pos of the caches in place
        res = vm["decode"](tvm.runtime.tensor(np.array([t], np.int32)), tvm.runtime.tensor(np.array([pos], np.int64)),
                           *cache, *dev_params)
        out.append(res[0].numpy()[0])
    return np.stack(out)


def test_fused_gemvs_match_the_reference_emitter(tiny_params):
    cfg, params, root = tiny_params
    tokens = [5, 17, 42, 7]
    ref = _logits(cfg, params, LinearEmitter(), root / "ref.so", tokens)
    # the TE forms (the hand kernels do not take these shapes); "te" also leaves out the prefill, whose grouped
    # GEMM's bound form cannot run on the CPU
    got = _logits(cfg, params, GpuLinearEmitter("te"), root / "gpu.so", tokens)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


def test_hand_expert_gemvs_match_the_reference_emitter(wide_params):
    """Routed stacks at 2, 3, 4 and 8 bits (gate and up in one SwiGLU call), and the dense layers as stacks of
    one, through the hand-written kernel's bodies (serial loops on the CPU)."""
    from moec.lower.decode_graph import DecodeBuilder
    cfg, params, root = wide_params
    mod = DecodeBuilder(cfg, copy.deepcopy(params), GpuLinearEmitter("serial")).build()
    hand = {gv.name_hint.rstrip("0123456789") for gv, f in mod.functions.items()
            if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and f.attrs.get("tirx.is_scheduled")}
    assert {"expert_dequant_gemv", "expert_dequant_swiglu", "dequant_gemv"} <= hand, hand  # not the TE forms
    tokens = [5, 17, 42, 7]
    ref = _logits(cfg, params, LinearEmitter(), root / "ref.so", tokens)
    got = _logits(cfg, params, GpuLinearEmitter("serial"), root / "gpu.so", tokens)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


@pytest.mark.parametrize("family", [
    {"shared_intermediate": 256, "shared_gate": True, "attention_bias": True, "dense_layers": [0],
     "dense_intermediate": 256, "num_layers": 3, "architecture": "Qwen2MoeForCausalLM"},  # Qwen2-MoE-like: shared expert, a dense layer, biased q/k/v
    {"expert_bias": True, "swiglu_limit": 7.0, "swiglu_alpha": 1.702, "attention_sinks": True,
     "attention_out_bias": True, "router_logit_bias": True, "architecture": "GptOssForCausalLM"},  # gpt-oss-like: expert biases and the clamped GLU (two GEMVs, no fused call)
])
def test_hand_gemvs_match_the_reference_emitter_across_families(tmp_path, family):
    """Other families' decode graphs through the hand kernels' serial bodies: dense layers, shared experts and
    biases around them give the reference emitter's logits."""
    cfg, params, root = _params(tmp_path, hidden_size=256, expert_intermediate=256, **family)
    tokens = [5, 17, 42]
    ref = _logits(cfg, params, LinearEmitter(), root / "ref.so", tokens)
    got = _logits(cfg, params, GpuLinearEmitter("serial"), root / "gpu.so", tokens)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))


def test_fused_gemv_rule_binds_the_routed_expert_gemv(tiny_params):
    """The routed-expert GEMV (which dlight's rules leave to Fallback) gets a warp-per-row schedule."""
    from moec.core.targets import load_target
    from moec.lower.decode_graph import DecodeBuilder
    cfg, params, _ = tiny_params
    target = load_target("jetson-orin-nano").tvm()
    mod = DecodeBuilder(cfg, copy.deepcopy(params), GpuLinearEmitter()).build()
    with target:
        for _, passes in CUDA_PHASES[:2]:
            mod = tvm.transform.Sequential(passes(target))(mod)
    experts = [(gv.name_hint, f) for gv, f in mod.functions.items() if gv.name_hint.startswith("expert_dequant_gemv")]
    assert experts
    for name, func in experts:
        with target:
            sch = FusedGemv().apply(func, target, False)
        assert sch is not None, name
        scheduled = sch.mod["main"]
        assert binds_threads(scheduled) and 'thread="threadIdx.x"' in scheduled.script()


@pytest.mark.parametrize("bits, width, codes", [(8, None, "*(uint*)(packed_local_ptr"), (3, None, None),
                                                (2, None, None), (8, 8, None)])
def test_fused_gemv_stages_activations_and_codes_with_vector_loads(bits, width, codes):
    """FusedGemv's staging, in the generated CUDA C: the activations' run in float4 loads; the codes of a
    width dividing 8 whose run is 4, 8 or 16 bytes in one vector load (8-bit: 4 k a step); 3-bit streams,
    2-bit runs of 2 bytes and nested stacks keep scalar code loads."""
    import sys
    sys.path.insert(0, str(REPO / "tools"))
    import gpu_kernels
    from moec.core.targets import load_target
    from moec.lower.cuda_kernels import cuda_source
    small = {"n": 64, "k": 512, "experts": 4, "top_k": 2, "group": 64}
    src = cuda_source(gpu_kernels.build(bits, load_target("cuda:sm_80").tvm(), small, width=width,
                                        expert_kernel="te").mod)  # FusedGemv on the TE forms
    assert "*(float4*)(x_local_ptr" in src
    staged = [ln for ln in src.splitlines() if "_local_ptr" in ln and ("packed" in ln or "seg" in ln) and "=" in ln]
    if codes is None:
        assert not [ln for ln in staged if "*(uint" in ln]
    else:
        assert any(codes in ln for ln in staged)


@pytest.mark.parametrize("family", [
    {},  # Mixtral-like, experts at 2, 3, 4, 8 and 16 bits
    {"shared_intermediate": 256, "shared_gate": True, "attention_bias": True, "dense_layers": [0],
     "dense_intermediate": 256, "num_layers": 3, "architecture": "Qwen2MoeForCausalLM"},
    {"expert_bias": True, "swiglu_limit": 7.0, "swiglu_alpha": 1.702, "attention_sinks": True, "sliding_window": 3,
     "attention_out_bias": True, "router_logit_bias": True, "architecture": "GptOssForCausalLM"},
])
def test_gpu_prefill_matches_its_decode_steps(tmp_path, family):
    """The CUDA backend's prefill function (grouped GEMMs and causal attention through the hand kernels' serial
    forms, attention with sinks and a window, norms and SiLU as TE forms), run on the CPU: a prompt in two chunks
    gives the logits of its decode steps."""
    from moec.lower.prefill_graph import PrefillBuilder
    cfg, params, root = _params(tmp_path, hidden_size=256, expert_intermediate=256, **family)
    emitter = GpuLinearEmitter("serial")
    mod = PrefillBuilder(cfg, copy.deepcopy(params), emitter).build()
    kernels = {"cuda_grouped_gemm", "cuda_dense_gemm"}
    kernels |= set() if "sliding_window" in family else {"cuda_causal_attention"}
    assert kernels <= {gv.name_hint.rstrip("0123456789") for gv in mod.functions}
    tokens = [5, 17, 42, 7, 99, 3, 64, 11, 250, 8]
    prefill, steps = prefill_and_steps(cfg, params, emitter, root / "gpu.so", tokens, split=6)
    np.testing.assert_allclose(prefill, steps, rtol=1e-4, atol=1e-4 * float(np.abs(steps).max()))


@pytest.mark.parametrize("name", ["headnorm_tied_mqa", "mla_qlora_sigmoid_bias"])
def test_gpu_prefill_of_other_attention_forms(tmp_path, name):
    """MQA with per-head q/k norms and DeepSeek-V2-like latent attention (small shapes: the grouped GEMM's 32-row,
    16-k tiles): the GPU prefill in two chunks gives its decode steps' logits."""
    from moec.core.plan import resolve_plan
    from moec.lower.params import build_params
    from moec.quant.weights import ModelWeights
    from tests.export.export_fixtures import feature_model
    model = feature_model(name)
    plan = resolve_plan("uniform:4", model.cfg, 16)
    weights = ModelWeights.from_model(model, plan)
    params = build_params(model.cfg, plan, weights.packed, weights.floats)
    tokens = [5, 17, 42, 7, 9, 3, 11]
    emitter = GpuLinearEmitter("serial")
    prefill, steps = prefill_and_steps(model.cfg, params, emitter, tmp_path / "gpu.so", tokens, split=4)
    np.testing.assert_allclose(prefill, steps, rtol=1e-4, atol=1e-4 * float(np.abs(steps).max()))
