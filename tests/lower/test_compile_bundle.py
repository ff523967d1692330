"""moec compile → bundle → runtime: greedy output equals the torch fake-quant model's."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from moec.cli.main import cli
from moec.core.errors import MoecError
from moec.models.checkpoint import load_checkpoint
from moec.quant.packed_model import fake_quantize_model
from moec.core.plan import resolve_plan
from tests.lower.plan_fixtures import mixed_plan

pytestmark = pytest.mark.tvm


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    from tests.conftest import make_tiny_checkpoint
    root = tmp_path_factory.mktemp("compile")
    ckpt = root / "ckpt"
    cfg = make_tiny_checkpoint(ckpt, seed=3, vocab_size=304)  # 19 row vectors: the LM head on the kernels
    plan_file = root / "mixed.json"
    # 5-bit attention and a 6-bit LM head: codes straddling words, on the CPU kernels (prefill and
    # decode); 6-bit embeddings (the lookup's dequantize; the frontier's mixed plans use them). The
    # built-in presets keep 5/6 out of their search space; a user preset allows them.
    plan_file.write_text(json.dumps(mixed_plan(cfg, attention=5, lm_head=6, embeddings=6).to_json()))
    preset = root / "host56.yaml"
    host = (Path(str(resources.files("moec") / "targets")) / "host.yaml").read_text()
    preset.write_text(host.replace("allowed_bits: [2, 3, 4, 8, 16]", "allowed_bits: [2, 3, 4, 5, 6, 8, 16]"))
    res = CliRunner().invoke(cli, ["compile", str(ckpt), "--plan", str(plan_file), "--out", str(root / "bundle"),
                                   "--target", str(preset), "--debug-dump", str(root / "dump"),
                                   "--activations", "float32"])  # exact: its tests compare with torch
    assert res.exit_code == 0, res.output
    return ckpt, plan_file, root / "bundle", root / "dump"


def test_greedy_matches_torch_fake_quant(compiled):
    from moec.artifact.weights_file import WeightsReader
    from moec.runtime.session import BundleSession
    ckpt, plan_file, bundle, _ = compiled
    model = load_checkpoint(ckpt)
    fake_quantize_model(model, resolve_plan(plan_file, model.cfg))
    sess = BundleSession(bundle)
    prompt = sess.tokenizer.encode("Experts in a mixture").ids
    got, stats = sess.generate(prompt, 32)
    assert got == model.generate_greedy(prompt, 32)
    assert stats.new_tokens == 32


def test_manifest_and_debug_dump(compiled):
    _, plan_file, bundle, dump = compiled
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["plan"]["experts"] == json.loads(plan_file.read_text())["experts"]
    ckpt = compiled[0]
    from moec.quant.accounting import plan_memory
    model = load_checkpoint(ckpt)
    assert manifest["weight_bytes"] == plan_memory(model, resolve_plan(plan_file, model.cfg)).total
    assert set(manifest["files"]) >= {"lib.so", "weights.bin", "weights.json", "tokenizer.json"}
    assert manifest["tvm_version"] and manifest["target"]["name"] == "host"
    # the 5-bit attention and the 6-bit LM head are in the kernel layout (words of 64 codes * b bits / 32)
    shapes = {k: v["shape"] for k, v in json.loads((bundle / "weights.json").read_text())["tensors"].items()}
    assert shapes["layers.0.attn.q_proj.weight.kweight"][-2] == 64 * 5 // 32
    assert shapes["lm_head.weight.kweight"][-2] == 64 * 6 // 32
    phases = sorted(p.name for p in dump.iterdir())
    assert phases[0] == "00-input.py" and any("legalize" in p for p in phases)


def test_tampered_bundle_is_refused(compiled, tmp_path):
    import shutil

    from moec.runtime.session import BundleSession
    _, _, bundle, _ = compiled
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    data = bytearray((copy / "weights.bin").read_bytes())
    data[len(data) // 2] ^= 1
    (copy / "weights.bin").write_bytes(bytes(data))
    with pytest.raises(MoecError, match="weights.bin.*sha256"):
        BundleSession(copy)
    res = CliRunner().invoke(cli, ["run", str(copy), "--prompt", "hi"])
    assert res.exit_code != 0 and "tampered" in res.output


def test_compile_errors_are_one_line(compiled, tmp_path):
    ckpt, _, _, _ = compiled
    for args, needle in ((["--target", "jetson-oring"], "unknown target"), (["--plan", "uniform:7"], "not allowed")):
        res = CliRunner().invoke(cli, ["compile", str(ckpt), "--out", str(tmp_path / "o"), *args])
        assert res.exit_code != 0 and needle in res.output and len(res.output.strip().splitlines()) == 1
        assert not (tmp_path / "o").exists()


def test_inspect_bundle(compiled):
    _, _, bundle, _ = compiled
    res = CliRunner().invoke(cli, ["inspect", str(bundle)])
    assert res.exit_code == 0, res.output
    assert "sha256 verified" in res.output and "expert bits:" in res.output
    assert "entries: decode, prefill; over RPC the weights are held on the device" in res.output
    res = CliRunner().invoke(cli, ["inspect", str(bundle), "--json"])
    assert json.loads(res.output)["format"] == "moec-bundle"


def test_inspect_names_how_rpc_drives_a_bundle():
    """Bundles compiled before the resident entries copy the weights each RPC call; CUDA bundles name their graphs."""
    from moec.artifact.inspect_bundle import _entries
    assert _entries({"entry": {"decode": "decode"}}) == ("entries: decode; over RPC every call copies the weights "
                                                         "(compiled before the resident entries)")
    cuda = {"entry": {n: n for n in ("decode", "decode_resident")}, "backend": {"name": "cuda", "cuda_graphs": True}}
    assert _entries(cuda) == ("entries: decode; over RPC the weights are held on the device (resident entries); "
                              "CUDA graphs")


def test_int8_activations_bundle(compiled, tmp_path):
    """--activations int8: decode GEMVs on int8 activations stay close to the exact bundle."""
    from tvm.target import codegen

    from moec.lower.kernels.factory import host_target
    from moec.runtime.session import BundleSession
    if not codegen.target_has_features("avx512vnni", host_target()):
        pytest.skip("int8-activation kernels need AVX-512 VNNI")
    ckpt, plan_file, bundle, _ = compiled
    res = CliRunner().invoke(cli, ["compile", str(ckpt), "--plan", str(plan_file), "--out", str(tmp_path / "b8"),
                                   "--target", str(plan_file.parent / "host56.yaml"), "--activations", "int8"])
    assert res.exit_code == 0, res.output
    exact, fast = BundleSession(bundle), BundleSession(tmp_path / "b8")
    assert fast.manifest["activations"] == "int8" and exact.manifest["activations"] == "float32"
    for t in [5, 9, 13, 21]:
        a, b = exact.step(t), fast.step(t)
        assert np.abs(a - b).max() <= 0.05 * np.abs(a).max()
        assert np.abs(a - b).max() > 0  # really a different (quantized-activation) kernel


def test_int8_activations_need_vnni(compiled, tmp_path):
    preset = tmp_path / "novnni.yaml"
    preset.write_text("name: novnni\nfamily: cpu\ntvm_target: {kind: llvm, mcpu: haswell}\nrpc_key: x\n"
                      "allowed_bits: [2, 3, 4, 5, 6, 8, 16]\nmemory_budget_mb: 100\n"
                      "energy_model: {pj_per_byte: 1, pj_per_op: 1, source: test}\n")
    ckpt, plan_file, _, _ = compiled
    res = CliRunner().invoke(cli, ["compile", str(ckpt), "--plan", str(plan_file), "--target", str(preset),
                                   "--out", str(tmp_path / "b"), "--activations", "int8"])
    assert res.exit_code == 2 and "avx512vnni" in res.output and not (tmp_path / "b").exists()


def test_onnx_export_and_in_memory_compile_give_the_same_bundle(compiled, tmp_path):
    """The design promise: the exported ONNX (per-expert annotations) lowers to exactly what compile builds
    in memory — same weights, same logits, same greedy tokens."""
    from moec.artifact.weights_file import WeightsReader
    from moec.runtime.session import BundleSession
    ckpt, plan_file, bundle, _ = compiled
    res = CliRunner().invoke(cli, ["compile", str(ckpt), "--plan", str(plan_file), "--out", str(tmp_path / "m"),
                                   "--target", str(plan_file.parent / "host56.yaml"), "--onnx", str(tmp_path / "onnx")])
    assert res.exit_code == 0 and "export (ONNX)" in res.output, res.output
    res = CliRunner().invoke(cli, ["build", str(tmp_path / "onnx"), "--out", str(tmp_path / "b"),
                                   "--target", str(plan_file.parent / "host56.yaml"), "--activations", "float32"])
    assert res.exit_code == 0, res.output
    mem, onnx = WeightsReader(bundle), WeightsReader(tmp_path / "b")
    assert sorted(mem.order) == sorted(onnx.order)
    for name in mem.order:
        np.testing.assert_array_equal(mem.array(name), onnx.array(name), err_msg=name)
    a, b = BundleSession(bundle), BundleSession(tmp_path / "b")
    prompt = a.tokenizer.encode("Experts in a mixture").ids
    assert a.generate(prompt, 24)[0] == b.generate(prompt, 24)[0]
    a.reset(), b.reset()
    for t in prompt:
        np.testing.assert_allclose(a.step(t), b.step(t), rtol=0, atol=1e-5)
