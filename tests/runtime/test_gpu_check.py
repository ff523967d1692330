"""tools/gpu_check: the shell script parses and dry-runs, the driver refuses to run without a GPU, and its
per-plan check (build, token comparison, timed decode with NVML) works end to end with a CPU bundle standing
in for the GPU one."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from moec.runtime.session import cuda_available
from tests.conftest import REPO
from tests.hardware.nvml_fixture import nvml  # noqa: F401 - fixture

pytestmark = pytest.mark.tvm
SCRIPT = REPO / "tools" / "gpu_check.sh"
sys.path.insert(0, str(REPO / "tools"))
import gpu_check  # noqa: E402


def test_script_parses_and_dry_runs(tmp_path):
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    env = {**os.environ, "PYTHON": sys.executable, "MOEC_CUDA_ARCH": "sm_86"}
    res = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(tmp_path / "o")], capture_output=True,
                         text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    assert "(arch sm_86 from $MOEC_CUDA_ARCH)" in res.stdout
    assert [ln.split(":", 1)[0] for ln in res.stdout.splitlines() if ln.startswith("plan ")] == \
        ["plan uniform", "plan uniform", "plan mixed", "plan nested"]
    assert "cuda:sm_86 bundle" in res.stdout and not (tmp_path / "o").exists()  # nothing built


@pytest.mark.skipif(cuda_available(), reason="this machine has a CUDA GPU")
def test_driver_without_a_gpu_is_one_line(capsys, tmp_path):
    assert gpu_check.main(["--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no CUDA GPU visible to TVM") and "\n" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("opts, needle", [(["--plans", "uniform:7"], "7 bits not allowed"),
                                          (["--plans", "fp8"], "unknown plan 'fp8'"),
                                          (["--kernel-bits", "4,x,5"], "--kernel-bits: x, 5 not in")])
def test_driver_bad_option_is_one_line(capsys, opts, needle):
    assert gpu_check.main([*opts, "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and needle in err and "\n" not in err


def test_mixed_plan_mixes_bits():
    from moec.models.checkpoint import load_config
    cfg = load_config(REPO / "reference" / "checkpoint")
    plan = gpu_check.plans_for(cfg, ["mixed"])["mixed"]
    bits = {b for row in plan.experts.values() for b in row.values()}
    assert bits == {2, 4, 8}


def test_plan_check_with_a_cpu_bundle_standing_in(tmp_path, nvml):
    """The GPU stage's logic on the CPU: the same build twice must give equal tokens, and the NVML
    reading (a fake 300 W GPU) must come out as J/token = 300 W / tokens per second."""
    from tests.conftest import make_tiny_checkpoint
    nvml(watts=300.0)
    make_tiny_checkpoint(tmp_path / "ckpt", max_position=64)
    from moec.models.checkpoint import load_config
    cfg = load_config(tmp_path / "ckpt")
    args = argparse.Namespace(checkpoint=tmp_path / "ckpt", out=tmp_path / "out", tokens=6, prompt="The quick brown",
                              gpu_target="host", copy_gbs=100.0)
    row = {"plan": "uniform:8"}
    gpu_check.check_plan("uniform:8", gpu_check.plans_for(cfg, ["uniform:8"])["uniform:8"], args, row)
    assert row["tokens = CPU"] == "yes"
    tok_s, j_tok = float(row["GPU tok/s"]), float(row["J/token"])
    assert j_tok * tok_s == pytest.approx(300.0, rel=0.1) and row["W"] in {"297", "298", "299", "300", "301", "302"}
    assert row["eff. GB/s"].endswith("%)")
    # the prefill of a long prompt (the prompt's ids repeated up to the model's 64 positions) and its decode steps
    assert row["prefill = steps"] == "yes" and row["prefill ms"].endswith("(62 tok)"), row
    assert row["by steps ms"].endswith("x)")
    assert "uniform:8" in gpu_check.table([row]) and "tokens = CPU" in gpu_check.table([row])


def test_transformers_baseline_decode_loop_on_the_cpu(tmp_path, nvml):
    """The transformers baseline's loop (its own model class and KV cache) on the CPU."""
    from tests.conftest import make_tiny_checkpoint
    nvml(watts=50.0)
    make_tiny_checkpoint(tmp_path / "ckpt", max_position=64)
    row = {}
    gpu_check.transformers_fp16(argparse.Namespace(checkpoint=tmp_path / "ckpt", prompt="The quick brown"), row,
                                device="cpu", dtype="float32")
    assert float(row["CPU tok/s"]) > 0 and float(row["J/token"]) * float(row["CPU tok/s"]) == pytest.approx(50, rel=0.1)


def test_torch_baseline_decode_loop_on_the_cpu(tmp_path, nvml):
    """The torch eager baseline's loop (cache reset per pass, RoPE tables moved to the device) on the CPU."""
    from tests.conftest import make_tiny_checkpoint
    nvml(watts=100.0)
    make_tiny_checkpoint(tmp_path / "ckpt", max_position=64)
    args = argparse.Namespace(checkpoint=tmp_path / "ckpt", prompt="The quick brown")
    row = {}
    gpu_check.torch_fp16(args, row, device="cpu", dtype="float32")
    assert float(row["CPU tok/s"]) > 0 and float(row["J/token"]) * float(row["CPU tok/s"]) == pytest.approx(100, rel=0.1)
    import moec.models.model as model_mod
    from moec.models.torch_ops import rope_tables
    assert model_mod.rope_tables is rope_tables  # restored


def test_table_compares_with_torch():
    rows = [{"plan": "uniform:4", "GPU tok/s": "300.0"}, {"plan": "mixed", "note": "failed: x"},
            {"plan": "transformers fp16", "GPU tok/s": "200.0"}]
    text = gpu_check.table(rows)
    assert rows[0]["vs HF fp16"] == "1.50x" and "vs HF fp16" not in rows[1] and "failed: x" in text


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_kernel_benchmark_compiles_for_cuda(bits):
    """The benchmarked kernel is the backend's fused GEMV, scheduled onto threads for the GPU (codegen only here)."""
    import gpu_kernels
    from moec.core.targets import load_target
    from moec.lower.cuda_kernels import count_kernels, cuda_source
    small = {"n": 64, "k": 256, "experts": 4, "top_k": 2, "group": 64}
    src = cuda_source(gpu_kernels.build(bits, load_target("cuda:sm_80").tvm(), small).mod)
    assert "expert_dequant_gemv" in src and count_kernels(src) >= 1 and "threadIdx.x" in src
    per_expert = 64 * 256 * bits // 8 + 64 * 4 * 2 + 64 * -(-4 * bits // 8)  # codes + fp16 scales + zeros
    assert gpu_kernels.routed_bytes(bits, **small) == 2 * per_expert


def test_script_without_dependencies_is_one_line(tmp_path):
    """An interpreter without moec's dependencies (pip offline or skipped) stops with one error line."""
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    env = {**os.environ, "PYTHON": str(bare / "bin" / "python"), "SKIP_INSTALL": "1", "PYTHONPATH": ""}
    res = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 2
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "lacks moec's dependencies" in errors[0] and not res.stdout


def test_prepare_refuses_a_folder_it_did_not_write(capsys, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert gpu_check.main(["--prepare", str(mine), "--arch", "sm_90"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "refusing to write into it" in err and "\n" not in err
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("opts, needle", [(["--from", "nowhere"], "no readable prepared.json"),
                                          (["--prepare", "a", "--from", "b"], "give one"),
                                          (["--shapes", "olmoe,huge"], "--shapes: huge not in")])
def test_halves_bad_options_are_one_line(capsys, opts, needle):
    assert gpu_check.main(opts) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and needle in err and "\n" not in err


def test_prepared_plan_runs_from_its_folder(tmp_path, nvml):
    """--prepare then --from, with a CPU bundle standing in for the CUDA one: the GPU half needs only the
    folder (tokens to match, steps, modelled bytes), not the checkpoint or TVM's compiler."""
    import json
    from tests.conftest import make_tiny_checkpoint
    nvml(watts=200.0)
    make_tiny_checkpoint(tmp_path / "ckpt", max_position=64)
    from moec.models.checkpoint import load_config
    cfg = load_config(tmp_path / "ckpt")
    args = argparse.Namespace(checkpoint=tmp_path / "ckpt", tokens=5, prompt="The quick brown", gpu_target="host",
                              copy_gbs=None)
    entry = gpu_check.prepare_plan("uniform:4", gpu_check.plans_for(cfg, ["uniform:4"])["uniform:4"], args,
                                   tmp_path / "prep")
    entry = json.loads(json.dumps(entry))  # what prepared.json holds
    assert len(entry["want"]) == 5 and entry["steps"] > 0 and entry["step_bytes"] > 0
    assert sorted(p.name for p in (tmp_path / "prep").iterdir()) == ["cuda-uniform4"]  # what the GPU needs
    row = {"plan": "uniform:4"}
    gpu_check.run_plan(entry, tmp_path / "prep", argparse.Namespace(copy_gbs=None), row)
    assert row["tokens = CPU"] == "yes" and float(row["GPU tok/s"]) > 0 and "%" not in row["eff. GB/s"]


def test_nested_kernel_cases_read_only_their_planes():
    import gpu_kernels
    cases = gpu_kernels.kernel_cases([2, 8], ["olmoe"])
    assert [gpu_kernels.case_label(c) for c in cases] == [
        "GEMV 2-bit olmoe 8x1024x2048", "GEMV nested8@2 olmoe 8x1024x2048",
        "GEMV 8-bit olmoe 8x1024x2048", "GEMV nested8@8 olmoe 8x1024x2048"]
    fixed2, nested2, fixed8, nested8 = (gpu_kernels.case_bytes(c) for c in cases)
    assert nested8 == fixed8  # all planes at the storage width: the fixed 8-bit stack's bytes
    sh = gpu_kernels.SHAPES["olmoe"]
    codes = sh["top_k"] * sh["n"] * sh["k"] // 4
    assert nested2 - codes == nested8 - 4 * codes  # same scales and 8-bit zeros, a quarter of the code bytes
    assert nested2 > fixed2  # the nested stack keeps its zeros at 8 bits


def test_nographs_plans_build_on_a_preset_without_cuda_graphs(tmp_path):
    """``NAME@nographs`` (any order with ``@int8``): the CUDA bundle is built on a preset file of the GPU target, its
    arch resolved, with ``cuda_graphs: false`` (the A/B baseline of CUDA graphs)."""
    from moec.core.targets import load_target
    from moec.lower.backends import backend_for
    assert gpu_check.plan_flags("nested@int8@nographs") == ("nested", {gpu_check.INT8, gpu_check.NO_GRAPHS})
    assert gpu_check.plan_flags("uniform:4@nographs@int8") == ("uniform:4", {gpu_check.INT8, gpu_check.NO_GRAPHS})
    assert gpu_check.plan_flags("uniform:4") == ("uniform:4", set())
    preset = load_target(gpu_check.graphless_target("cuda:sm_90", tmp_path))
    assert not preset.cuda_graphs and preset.tvm_target["arch"] == "sm_90" and load_target("cuda:sm_90").cuda_graphs
    assert backend_for(preset).manifest()["cuda_graphs"] is False


def test_prefill_gemm_cases_compile_for_cuda_and_run_on_the_cpu():
    """The kit's prefill grouped GEMM case: the CUDA build holds the hand kernel, and the same module with the
    kernel's serial form gives ``x @ dequantize(W).T`` per expert on the CPU (so the figures time a correct kernel)."""
    import gpu_kernels
    import numpy as np
    import tvm
    from tvm import relax

    from moec.core.targets import load_target
    from moec.lower.cuda_kernels import cuda_source
    from moec.lower.schedules import cuda_gemm
    from moec.quant.packed_model import PackedWeight
    cases = gpu_kernels.gemm_cases([4], ["olmoe", "dram"])
    assert [gpu_kernels.case_label(c) for c in cases] == ["prefill GEMM 4-bit olmoe 64x64 rows x1024x2048"]
    assert gpu_kernels.gemm_cases([4], ["dram"]) == []
    small = {"n": 64, "k": 128, "experts": 3, "group": 64, "rows": 5}
    src = cuda_source(gpu_kernels.build_gemm(4, load_target("cuda:sm_80").tvm(), small).mod)
    assert "cuda_grouped_gemm" in src and "threadIdx.x" in src
    serial = cuda_gemm.cuda_grouped_gemm("fixed", 4, 64, 128, 3, 64, bind=False)
    mod = gpu_kernels.grouped_gemm_module(4, **small)
    gv = mod.get_global_var("cuda_grouped_gemm")
    mod[gv] = serial.without_attr("global_symbol")
    lib = relax.build(mod, target="llvm")
    args = gpu_kernels.gemm_inputs(4, **small)
    out = tvm.runtime.vm.VirtualMachine(lib, tvm.cpu())["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()
    x, packed, scale, zero, offsets = args
    for e in range(3):
        w = PackedWeight((64, 128), 4, 64, packed[e], scale[e], zero[e]).dequantize()
        np.testing.assert_allclose(out[offsets[e]:offsets[e + 1]], x[offsets[e]:offsets[e + 1]] @ w.T,
                                   rtol=1e-4, atol=1e-4 * float(np.abs(out).max()))
