"""``--activations auto`` (the default): int8 where the target's kernels have int8 dot products, per width
and kernel kind; float32 elsewhere; the manifest records the resolved type."""

from __future__ import annotations

import json

import pytest
import tvm
from click.testing import CliRunner

from moec.cli.main import cli
from moec.lower.kernel_linear import KernelEmitter
from moec.lower.kernels.factory import make_gemv, make_grouped_gemm

pytestmark = pytest.mark.tvm


def _x86(mcpu: str) -> tvm.target.Target:
    return tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "mtriple": "x86_64-linux-gnu"})


def test_auto_is_int8_only_where_int8_kernels_exist():
    assert KernelEmitter(_x86("icelake-server"), "auto").activations == "int8"  # AVX-512 VNNI + VBMI
    assert KernelEmitter(_x86("skylake-avx512"), "auto").activations == "float32"  # no VNNI
    assert KernelEmitter(_x86("skylake-avx512"), "float32").activations == "float32"


def test_auto_keeps_float32_for_a_width_without_an_int8_kernel():
    """Cascade Lake has VNNI but not VBMI, which the 3-bit int8 kernels need: auto gives 3-bit weights float32
    activations and 4-bit ones int8, where an explicit int8 fails the build."""
    em = KernelEmitter(_x86("cascadelake"), "auto")
    assert em.activations == "int8"
    assert em._auto_has_int8(make_gemv, 4, 1) and em._auto_has_int8(make_grouped_gemm, 4)
    assert not em._auto_has_int8(make_gemv, 3, 1) and not em._auto_has_int8(make_grouped_gemm, 3)
    assert KernelEmitter(_x86("cascadelake"), "int8")._auto_has_int8(make_gemv, 3, 1)  # explicit: asks the builder


def test_default_compile_records_the_resolved_activations(tiny_checkpoint, tmp_path):
    from tvm.target import codegen

    from moec.lower.kernels.factory import host_target
    res = CliRunner().invoke(cli, ["compile", str(tiny_checkpoint), "--plan", "uniform:4", "--out",
                                   str(tmp_path / "b"), "--target", "host"])
    assert res.exit_code == 0, res.output
    want = "int8" if codegen.target_has_features("avx2", host_target()) else "float32"  # VNNI or AVX2 kernels
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["activations"] == want
    preset = tmp_path / "noavx2.yaml"
    preset.write_text("name: noavx2\nfamily: cpu\ntvm_target: {kind: llvm, mcpu: x86-64}\nrpc_key: x\n"
                      "allowed_bits: [2, 3, 4, 8, 16]\nmemory_budget_mb: 100\n"
                      "energy_model: {pj_per_byte: 1, pj_per_op: 1, source: test}\n")
    res = CliRunner().invoke(cli, ["compile", str(tiny_checkpoint), "--plan", "uniform:4", "--out",
                                   str(tmp_path / "h"), "--target", str(preset)])
    assert res.exit_code == 0, res.output  # auto on a target without VNNI or AVX2: float32, not an error
    assert json.loads((tmp_path / "h" / "manifest.json").read_text())["activations"] == "float32"
