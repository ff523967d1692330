"""CUDA targets (Jetson: sm_87 + aarch64 host; cuda: any sm_XX + x86_64 host): source, nvcc fatbin, bundle."""

from __future__ import annotations

import shutil
import struct

import pytest
import tvm
from tvm import relax

from moec.core.errors import MoecError
from moec.core.targets import load_target
from moec.lower.backends import backend_for
from moec.lower.cuda_kernels import count_kernels, cuda_source, find_nvcc
from moec.lower.pipeline import CUDA_PHASES, make_pipeline

pytestmark = pytest.mark.tvm

needs_nvcc = pytest.mark.skipif(find_nvcc() is None, reason="needs nvcc (CUDA toolkit)")
needs_cross = pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None,
                                 reason="needs g++-aarch64-linux-gnu (installed by .ci/run)")


def _gemv_and_softmax() -> tvm.IRModule:
    """A float GEMV followed by a softmax: dlight's GEMV and reduction rules both apply."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 256), "float32"))
    w = relax.Var("w", relax.TensorType((128, 256), "float32"))
    with bb.function("main", [x, w]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, relax.op.permute_dims(w)))
            out = bb.emit_output(bb.emit(relax.op.nn.softmax(y)))
        bb.emit_func_output(out)
    return bb.get()


def _compile(mod, preset="jetson-agx-orin"):
    target = load_target(preset).tvm()
    with target:
        return tvm.compile(mod, target=target, relax_pipeline=make_pipeline(CUDA_PHASES))


def test_cuda_source_is_generated_with_an_aarch64_host():
    ex = _compile(_gemv_and_softmax())
    src = cuda_source(ex.mod)
    assert src is not None and count_kernels(src) >= 2
    assert "threadIdx.x" in src and "blockIdx.x" in src  # scheduled onto threads, not one serial loop
    host = ex.mod.imports[0]
    assert host.kind == "llvm" and 'target triple = "aarch64' in host.inspect_source("ll")


def elf_cuda_sm(fatbin: bytes) -> list[int]:
    """SM numbers of the CUDA ELF (e_machine 190) cubins inside a fatbin."""
    sms, i = [], fatbin.find(b"\x7fELF")
    while i >= 0:
        machine = struct.unpack("<H", fatbin[i + 18:i + 20])[0]
        flags = struct.unpack("<I", fatbin[i + 48:i + 52])[0]
        if machine == 190:  # EI_ABIVERSION 8 (CUDA 12.8+): SM in bits 8-15; before: bits 0-7
            sms.append((flags >> 8) & 0xFF if fatbin[i + 8] >= 8 else flags & 0xFF)
        i = fatbin.find(b"\x7fELF", i + 1)
    return sms


@needs_nvcc
def test_nvcc_compiles_the_kernels_for_sm_87():
    from moec.lower.cuda_kernels import compile_cuda
    target = load_target("jetson-orin-nano").tvm()
    kernels = compile_cuda(_compile(_gemv_and_softmax(), "jetson-orin-nano").mod, target)
    assert kernels.arch == "sm_87" and elf_cuda_sm(kernels.fatbin) == [87]


@needs_nvcc
@needs_cross
def test_jetson_agx_orin_bundle(tmp_path):
    from tests.conftest import compile_tiny_bundle
    from moec.runtime.remote import elf_machine
    out, manifest = compile_tiny_bundle(tmp_path, "--target", "jetson-agx-orin", "--plan", "uniform:3", seed=2)
    assert elf_machine(out / "lib.so") == "aarch64"
    assert manifest["cuda"]["arch"] == "sm_87" and manifest["cuda"]["kernels"] > 10
    assert manifest["kernels"] == "gpu-fused"  # fused dequantize-GEMVs, not dequantize-then-matmul
    src = (out / "kernels.cu").read_text()
    assert "<lambda>" not in src and count_kernels(src) == manifest["cuda"]["kernels"]
    assert elf_cuda_sm((out / manifest["cuda"]["fatbin"]).read_bytes()) == [87]
    assert src.encode() in (out / "lib.so").read_bytes()  # the device compiles it at load time


@needs_cross
def test_missing_nvcc_is_one_line(monkeypatch):
    monkeypatch.setattr("moec.lower.cuda_kernels.find_nvcc", lambda: None)
    with pytest.raises(MoecError, match="target 'jetson-agx-orin': compiling CUDA kernels for sm_87 needs nvcc"):
        preset = load_target("jetson-agx-orin")
        backend_for(preset).require_toolchain(preset)


def test_cuda_pipeline_has_gpu_schedules():
    """Every PrimFunc is scheduled (bound to threads) by the cuda family's schedule phase."""
    mod = _gemv_and_softmax()
    target = load_target("jetson-agx-orin").tvm()
    with target:
        for _, passes in CUDA_PHASES[:3]:
            mod = tvm.transform.Sequential(passes(target))(mod)
    funcs = [f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    assert len(funcs) >= 2 and all(f.attrs and f.attrs.get("tirx.is_scheduled") for f in funcs)


def test_an_unscheduled_gpu_function_fails_the_build(monkeypatch):
    """The safety net: a PrimFunc left without thread bindings would run on the host, so it is refused."""
    monkeypatch.setattr("moec.lower.schedules.gpu_rules.binds_threads", lambda func: False)
    with pytest.raises(RuntimeError, match="no GPU schedule for .*matmul"):
        _compile(_gemv_and_softmax())


def test_cuda_preset_has_an_x86_64_host_and_the_shared_backend():
    preset = load_target("cuda:sm_86")
    assert backend_for(preset) is backend_for(load_target("jetson-agx-orin"))
    ex = _compile(_gemv_and_softmax(), "cuda:sm_86")
    assert count_kernels(cuda_source(ex.mod)) >= 2
    assert 'target triple = "x86_64' in ex.mod.imports[0].inspect_source("ll")


@needs_nvcc
def test_nvcc_compiles_the_cuda_preset_for_the_given_arch():
    from moec.lower.cuda_kernels import compile_cuda
    target = load_target("cuda:sm_89").tvm()
    kernels = compile_cuda(_compile(_gemv_and_softmax(), "cuda:sm_89").mod, target)
    assert kernels.arch == "sm_89" and elf_cuda_sm(kernels.fatbin) == [89]


@needs_nvcc
def test_cuda_preset_bundle(tmp_path):
    from tests.conftest import compile_tiny_bundle
    from moec.runtime.remote import elf_machine
    out, manifest = compile_tiny_bundle(tmp_path, "--target", "cuda:sm_86", "--plan", "uniform:4", seed=3)
    assert elf_machine(out / "lib.so") == "x86_64"
    assert manifest["target"]["tvm_target"]["arch"] == "sm_86" and manifest["cuda"]["arch"] == "sm_86"
    assert manifest["backend"]["runtime_device"] == "cuda" and manifest["kernels"] == "gpu-fused"
    assert elf_cuda_sm((out / manifest["cuda"]["fatbin"]).read_bytes()) == [86]


@pytest.mark.parametrize("name", ["headnorm_tied_mqa", "mla_softmax_scaled"])
def test_model_compiles_for_jetson(name):
    """A Qwen3-like model (per-head q/k norm, MQA) and a DeepSeek-V2-like one (latent attention) compile
    to CUDA (the functions the bundler builds: decode, and prefill with the grouped GEMMs and the attention
    kernel). The decode attention scores over the symbolic cache length used to get a dlight schedule with
    thread-local buffers of cache-dependent size ("Can only handle constant size stack allocation"); ``Checked``
    now refuses such a schedule. Code generation only: no GPU, no nvcc."""
    from moec.core.plan import resolve_plan
    from moec.lower.decode_graph import DecodeBuilder
    from moec.lower.params import build_params
    from moec.lower.prefill_graph import PrefillBuilder
    from moec.quant.weights import ModelWeights
    from tests.export.export_fixtures import feature_model
    model = feature_model(name)
    plan = resolve_plan("uniform:4", model.cfg, 16)
    weights = ModelWeights.from_model(model, plan)
    params = build_params(model.cfg, plan, weights.packed, weights.floats)
    preset = load_target("jetson-agx-orin")
    emitter = backend_for(preset).emitter(preset.tvm(), "float32")
    bb = relax.BlockBuilder()
    DecodeBuilder(model.cfg, params, emitter).build(bb)
    prefill = PrefillBuilder(model.cfg, params, emitter)
    assert prefill.supported()  # the grouped GEMM takes these stacks (32-row, 16-k tiles)
    prefill.build(bb)
    src = cuda_source(_compile(bb.get()).mod)
    assert src is not None and count_kernels(src) > 10 and "cuda_grouped_gemm" in src
    assert "cuda_causal_attention" in src  # built with the bundle's passes (common-subexpression elimination too)
