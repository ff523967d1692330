"""The backend registry: one object per target kind; a CPU without tuned schedules is refused, never slow."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from moec.cli.main import cli
from moec.core.errors import MoecError
from moec.core.targets import load_target
from moec.lower.backends import BACKENDS, backend_for
from moec.lower.gpu_linear import GpuLinearEmitter
from moec.lower.kernel_linear import KernelEmitter
from moec.lower.pipeline import CPU_PHASES, CUDA_PHASES
from moec.lower.schedules import arm, x86

pytestmark = pytest.mark.tvm


def _preset(tmp_path, name: str, tvm_target: str):
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\nfamily: cpu\ntvm_target: {tvm_target}\nrpc_key: x\n"
                    "allowed_bits: [2, 3, 4, 8, 16]\nmemory_budget_mb: 100\n"
                    "energy_model: {pj_per_byte: 1, pj_per_op: 1, source: test}\n")
    return path


@pytest.mark.parametrize("preset, name, phases, schedules", [
    ("raspberry-pi-5", "arm", CPU_PHASES, arm), ("aarch64-generic", "arm", CPU_PHASES, arm),
    ("jetson-orin-nano", "cuda", CUDA_PHASES, None)])
def test_presets_pick_their_backend(preset, name, phases, schedules):
    backend = backend_for(load_target(preset))
    assert backend is BACKENDS[name] and backend.phases == phases and backend.schedules is schedules
    assert backend.manifest()["runtime_device"] == ("cuda" if name == "cuda" else "cpu")


def test_x86_host_backend_and_emitters(tmp_path):
    backend = backend_for(load_target(_preset(tmp_path, "x", "{kind: llvm, mtriple: x86_64-linux-gnu}")))
    assert backend.name == "x86" and backend.schedules is x86
    assert isinstance(backend.emitter(load_target("host").tvm()), KernelEmitter)
    assert isinstance(BACKENDS["cuda"].emitter(load_target("jetson-orin-nano").tvm()), GpuLinearEmitter)
    with pytest.raises(ValueError, match="activations must be one of"):
        BACKENDS["cuda"].emitter(load_target("jetson-orin-nano").tvm(), "fp8")


def test_cpu_without_schedules_is_refused_in_one_line(tmp_path):
    preset = load_target(_preset(tmp_path, "riscv-board", "{kind: llvm, mtriple: riscv64-linux-gnu}"))
    with pytest.raises(MoecError, match="target 'riscv-board': no backend with tuned kernels for 'riscv' "
                                        "\\(it would run slow reference kernels\\); choices: arm, cuda, x86"):
        backend_for(preset)


def test_reference_kernels_only_on_request_and_loudly(tmp_path, caplog):
    preset = load_target(_preset(tmp_path, "riscv-board", "{kind: llvm, mtriple: riscv64-linux-gnu}"))
    with caplog.at_level("WARNING", logger="moec"):
        backend = backend_for(preset, reference_kernels=True)
    assert backend.name == "riscv" and backend.schedules is None and backend.phases == CPU_PHASES
    (record,) = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "slow reference kernels" in record.getMessage() and "\n" not in record.getMessage()


def test_compile_for_a_cpu_without_schedules_fails_before_loading(tmp_path):
    preset = _preset(tmp_path, "riscv-board", "{kind: llvm, mtriple: riscv64-linux-gnu}")
    res = CliRunner().invoke(cli, ["compile", str(tmp_path / "no-checkpoint"), "--target", str(preset),
                                   "--plan", "uniform:4", "--out", str(tmp_path / "b")])
    assert res.exit_code != 0 and len(res.output.strip().splitlines()) == 1
    assert "no backend with tuned kernels for 'riscv'" in res.output and not (tmp_path / "b").exists()


def test_bundle_manifest_names_its_backend(tmp_path):
    from tests.conftest import compile_tiny_bundle
    _, manifest = compile_tiny_bundle(tmp_path, "--plan", "uniform:4", seed=1)
    assert manifest["backend"] == backend_for(load_target("host")).manifest()
    assert manifest["kernels"] == "scheduled"


def test_layers_of_one_shape_share_their_kernels():
    """Two decoder layers with the same shapes and bit classes call the same kernel functions: the module
    holds one GEMV (and one grouped GEMM) per distinct (bits, shape, group, call shape), not one per layer,
    so LLVM compiles a kernel once however deep the model is."""
    import copy

    import tvm
    from tvm import relax

    from moec.core.plan import BitPlan
    from moec.lower.decode_graph import DecodeBuilder
    from moec.lower.kernel_linear import apply_kernel_layout
    from moec.lower.params import build_params
    from moec.lower.prefill_graph import PrefillBuilder
    from moec.quant.weights import ModelWeights
    from tests.export.export_fixtures import feature_model
    model = feature_model("headnorm_tied_mqa")
    cfg = model.cfg
    plan = BitPlan({l: {e: (4 if e % 2 else 8) for e in range(cfg.num_experts)} for l in cfg.moe_layers},
                   {"attention": 8, "lm_head": 8, "embeddings": 8}, group_size=16, method="rtn",
                   model_fingerprint=cfg.fingerprint())
    weights = ModelWeights.from_model(model, plan)
    params = build_params(cfg, plan, weights.packed, weights.floats)
    preset = load_target("host")
    emitter = backend_for(preset).emitter(preset.tvm(), "float32")
    apply_kernel_layout(params, emitter)
    bb = relax.BlockBuilder()
    DecodeBuilder(cfg, copy.deepcopy(params), emitter).build(bb)
    PrefillBuilder(cfg, params, emitter).build(bb)
    mod = bb.get()
    kernels = [gv.name_hint for gv, f in mod.functions.items()
               if isinstance(f, tvm.tirx.PrimFunc) and gv.name_hint.startswith(("gemv_", "gemm_"))]
    assert len(kernels) == len(set(kernels))
    assert not any("layers" in k for k in kernels)
    attention = [gv.name_hint for gv in mod.functions if gv.name_hint.startswith(("causal_", "attn_softmax"))]
    # not one per layer: one fused attention kernel (no sliding window, no sinks), one RMSNorm kernel per width
    assert len(attention) == 1 and attention[0].startswith("causal_attention_"), attention
    norms = [gv.name_hint for gv in mod.functions if gv.name_hint.startswith("row_rms_norm")]
    assert len(norms) == len(set(norms)) and 1 <= len(norms) <= 2, norms  # hidden, head_dim
    decode = mod["decode"].script()
    experts = [k for k in kernels if k.startswith("gemv_b4_")]  # only routed experts are 4-bit
    calls = {k: len(re.findall(rf"\b{k}\b", decode)) for k in experts}
    assert experts and all(n >= cfg.num_layers for n in calls.values()), calls
