"""Nested bundles with int8 activations (``moec compile --nested 8 --activations int8``): the routed
experts run the int8 nested GEMV (the prefill the int8 nested grouped GEMM); at the stored width the
bundle equals the fixed int8 bundle of the same plan bit for bit, decode steps and prefill, and a plan
switch mid-generation follows the float32-activation nested bundle.
Each test runs for the host on AVX-512 VNNI ("vnni") and for the ``x86-64-v3`` preset (AVX2 kernels,
"avx2"; built on any x86 host with AVX2, the CI machine included), whose streamed compile also takes
a mixed 2/3/4/8 plan under ``auto`` (3-bit experts and their prefill GEMMs on float32 activations)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner
from tvm.target import codegen

from moec.cli.main import cli
from moec.lower.kernels.factory import host_target
from tests.runtime.nested_fixtures import GS, mixed_plan

pytestmark = [pytest.mark.tvm, pytest.mark.xdist_group("nested-int8")]  # one worker builds the bundles

NEEDS = {"vnni": "avx512vnni", "avx2": "avx2"}  # the host feature each variant's bundles run on
TARGETS = {"vnni": "host", "avx2": "x86-64-v3"}


@pytest.fixture(scope="session")
def _built() -> dict:
    """Bundles built so far in this process, by variant: a parametrized module fixture was set up again
    whenever pytest (or xdist) ran the variants' tests interleaved (4 builds of 3 bundles instead of 2)."""
    return {}


@pytest.fixture(params=["vnni", "avx2"])
def bundles(request, _built, tmp_path_factory):
    """(root with nested_i8, fixed_i8 and nested_f32 bundles of one tiny checkpoint, the mixed plan file)."""
    if not codegen.target_has_features(NEEDS[request.param], host_target()):
        pytest.skip(f"needs {NEEDS[request.param]}")
    if request.param not in _built:
        _built[request.param] = _build(request.param, tmp_path_factory)
    return _built[request.param]


def _build(variant: str, tmp_path_factory):
    from tests.conftest import make_tiny_checkpoint
    root = tmp_path_factory.mktemp(f"nested_int8_{variant}")
    ckpt = root / "ckpt"
    cfg = make_tiny_checkpoint(ckpt, seed=5)
    plan_file = root / "mixed.json"
    plan_file.write_text(json.dumps(mixed_plan(cfg).to_json()))
    common = [str(ckpt), "--plan", "uniform:8", "--group-size", str(GS), "--method", "rtn",
              "--target", TARGETS[variant]]
    for name, extra in (("nested_i8", ["--nested", "8", "--activations", "int8"]),
                        ("nested_f32", ["--nested", "8", "--activations", "float32"]),
                        ("fixed_i8", ["--activations", "int8"])):
        res = CliRunner().invoke(cli, ["compile", *common, *extra, "--out", str(root / name)])
        assert res.exit_code == 0, res.output
    return root, plan_file


def _steps(sess, tokens):
    """Logits of feeding ``tokens`` one decode step each."""
    return [sess.step(t) for t in tokens]


def test_int8_nested_bundle_runs_the_int8_kernel_and_equals_the_fixed_int8_bundle(bundles):
    from moec.runtime.session import BundleSession
    root, _ = bundles
    manifest = json.loads((root / "nested_i8" / "manifest.json").read_text())
    assert manifest["activations"] == "int8"
    library = (root / "nested_i8" / "lib.so").read_bytes()
    # the routed gate and up: one nested SwiGLU GEMV a layer (no GEMV of the shared token row is left; w2 reads
    # one row per routed expert, "_xe")
    assert re.search(rb"__tvm_ffi_nested_swiglu_b8_n\d+_k\d+_g\d+_s\d+_t\d+_i8\b", library)
    assert not re.search(rb"__tvm_ffi_nested_b8_n\d+_k\d+_g\d+_s\d+_t\d+_i8\b", library)
    with BundleSession(root / "nested_i8") as nested, BundleSession(root / "fixed_i8") as fixed, \
            BundleSession(root / "nested_f32") as f32:
        prompt = nested.tokenizer.encode("Experts in a mixture").ids
        got, want, other = _steps(nested, prompt), _steps(fixed, prompt), _steps(f32, prompt)
        for g, w in zip(got, want):
            assert np.array_equal(g, w)  # the stored width: the same integer sums, the same float epilogue
        assert not all(np.array_equal(g, o) for g, o in zip(got, other))  # int8 activations, not float32
        nested.reset()
        fixed.reset()
        # the prefill's int8 nested grouped GEMM: the fixed int8 grouped GEMM's sums and terms
        assert np.array_equal(nested.prefill(prompt), fixed.prefill(prompt))


def test_plan_switch_mid_generation_with_int8_activations(bundles):
    """Greedy decode: 4 tokens at the stored width (= the fixed int8 bundle's), a switch to the mixed
    2/3/4/8 plan for 4 tokens, back to uniform 8: the tokens equal the float32-activation nested
    bundle's under the same switches, and the mixed steps differ from uniform 8's."""
    from moec.runtime.session import BundleSession
    root, plan_file = bundles
    runs = {}
    for name in ("nested_i8", "nested_f32"):
        with BundleSession(root / name) as sess:
            prompt = sess.tokenizer.encode("Experts in a mixture").ids
            logits = _steps(sess, prompt)[-1]
            tokens, per_step = [], []
            for i in range(12):
                if i == 4:
                    sess.set_plan(plan_file)
                if i == 8:
                    sess.set_plan("uniform:8")
                tokens.append(int(np.argmax(logits)))
                logits = sess.step(tokens[-1])
                per_step.append(logits)
            runs[name] = tokens, per_step
    assert runs["nested_i8"][0] == runs["nested_f32"][0]
    with BundleSession(root / "fixed_i8") as fixed:
        prompt = fixed.tokenizer.encode("Experts in a mixture").ids
        logits = _steps(fixed, prompt)[-1]
        for i in range(4):
            assert int(np.argmax(logits)) == runs["nested_i8"][0][i]
            logits = fixed.step(runs["nested_i8"][0][i])
            assert np.array_equal(logits, runs["nested_i8"][1][i])
        # the same tokens under uniform 8 all along: the mixed plan's steps (4..7) read other weights
        for i in range(4, 8):
            logits = fixed.step(runs["nested_i8"][0][i])
            assert not np.array_equal(logits, runs["nested_i8"][1][i])


def test_auto_mixed_plan_on_avx2_runs_int8_where_kernels_exist(bundles, tmp_path):
    """``x86-64-v3`` under ``auto`` with a mixed 2/3/4/8 plan (streamed compile): the manifest says int8; 2/4/8-bit
    experts run the AVX2 int8 GEMVs and prefill GEMMs, 3-bit ones the float32 kernels; greedy tokens equal the
    float32 bundle's."""
    from moec.runtime.session import BundleSession
    root, plan_file = bundles
    if "avx2" not in root.name:
        pytest.skip("the x86-64-v3 variant")
    ckpt = root / "ckpt"
    common = [str(ckpt), "--plan", str(plan_file), "--group-size", str(GS), "--method", "rtn", "--target", "x86-64-v3"]
    for name, acts in (("auto", "auto"), ("f32", "float32")):
        res = CliRunner().invoke(cli, ["compile", *common, "--activations", acts, "--out", str(tmp_path / name)])
        assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "auto" / "manifest.json").read_text())["activations"] == "int8"
    runs = []
    for name in ("auto", "f32"):
        with BundleSession(tmp_path / name) as sess:
            prompt = sess.tokenizer.encode("Experts in a mixture").ids
            logits = sess.prefill(prompt)
            tokens, steps = [], []
            for _ in range(8):
                tokens.append(int(np.argmax(logits)))
                logits = sess.step(tokens[-1])
                steps.append(logits)
            runs.append((tokens, steps))
    assert runs[0][0] == runs[1][0]
    assert not all(np.array_equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))  # int8 activations ran
