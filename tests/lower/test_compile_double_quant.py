"""A plan with double-quantized (``u8``) scales end to end: host bundle tokens equal torch fake quant, the
manifest's bytes are the packed bytes, ONNX (dequantized scales) matches torch in onnxruntime, and the
refusals (CUDA, nested storage, building from that ONNX) are one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from moec.cli.main import cli
from moec.core.plan import BitPlan, resolve_plan
from moec.models.checkpoint import load_checkpoint
from moec.quant.packed_model import fake_quantize_model
from tests.export.export_fixtures import torch_logits

pytestmark = pytest.mark.tvm


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    from tests.conftest import make_tiny_checkpoint
    root = tmp_path_factory.mktemp("dq")
    ckpt = root / "ckpt"
    # K = 128: 4 groups of 32 per row (a partial super-block of 8); 19 row vectors of LM head on the kernels
    cfg = make_tiny_checkpoint(ckpt, seed=4, vocab_size=304, hidden_size=128, expert_intermediate=128)
    plan_file = root / "mixed.json"
    # two expert bit classes (routed rows of the other class are -1), 8-bit attention, 3-bit head and embeddings
    experts = {l: {e: (3, 4)[(l + e) % 2] for e in range(cfg.num_experts)} for l in cfg.moe_layers}
    BitPlan(experts, {"attention": 8, "lm_head": 3, "embeddings": 3}, group_size=32, method="mse",
            model_fingerprint=cfg.fingerprint()).save(plan_file)
    res = CliRunner().invoke(cli, ["compile", str(ckpt), "--plan", str(plan_file), "--scales", "u8",
                                   "--out", str(root / "bundle")])
    assert res.exit_code == 0, res.output
    return ckpt, plan_file, root / "bundle"


def test_bundle_tokens_equal_torch_fake_quant(compiled):
    from moec.runtime.session import BundleSession
    ckpt, plan_file, bundle = compiled
    model = load_checkpoint(ckpt)
    plan = resolve_plan(plan_file, model.cfg, scales="u8")
    fake_quantize_model(model, plan)
    sess = BundleSession(bundle)
    prompt = sess.tokenizer.encode("Experts in a mixture").ids
    got, _ = sess.generate(prompt, 24)
    assert got == model.generate_greedy(prompt, 24)


def test_manifest_records_u8_scales_and_true_bytes(compiled):
    from moec.quant.accounting import plan_memory
    ckpt, plan_file, bundle = compiled
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["plan"]["scales"] == "u8"
    index = json.loads((bundle / "weights.json").read_text())
    names = index["tensors"] if "tensors" in index else index
    assert any(n.endswith(".ksuper_scale") for n in names)
    model = load_checkpoint(ckpt)
    fp16 = plan_memory(model, resolve_plan(plan_file, model.cfg)).total
    u8 = plan_memory(model, resolve_plan(plan_file, model.cfg, scales="u8")).total
    assert u8 < fp16


def test_onnx_export_matches_torch_and_build_refuses_it(compiled, tmp_path):
    from moec.export.ort_runner import OrtModel
    ckpt, plan_file, _ = compiled
    res = CliRunner().invoke(cli, ["export", str(ckpt), "--plan", str(plan_file), "--scales", "u8",
                                   "--out", str(tmp_path / "onnx")])
    assert res.exit_code == 0, res.output
    model = load_checkpoint(ckpt)
    fake_quantize_model(model, resolve_plan(plan_file, model.cfg, scales="u8"))
    ids = [3, 17, 42, 5, 99, 7]
    ref = torch_logits(model, ids)
    logits, _ = OrtModel(tmp_path / "onnx").prefill(ids)
    assert float(np.abs(logits - ref).max()) < 1e-3
    res = CliRunner().invoke(cli, ["build", str(tmp_path / "onnx"), "--out", str(tmp_path / "b")])
    assert res.exit_code != 0 and "scales" in res.output and len(res.output.strip().splitlines()) == 1


def test_cuda_and_nested_refuse_u8_scales(compiled, tmp_path):
    from moec.core.errors import MoecError
    from moec.core.targets import load_target
    from moec.lower.bundler import require_scale_kernels
    ckpt, plan_file, _ = compiled
    model = load_checkpoint(ckpt)
    plan = resolve_plan(plan_file, model.cfg, scales="u8")
    with pytest.raises(MoecError, match="'u8' scales have kernels for the arm and x86 backends only, not 'cuda'"):
        require_scale_kernels(plan, load_target("cuda"))
    require_scale_kernels(plan, load_target("raspberry-pi-5"))  # ARM: kernels exist
    res = CliRunner().invoke(cli, ["compile", str(ckpt), "--plan", "uniform:8", "--group-size", "32", "--scales", "u8",
                                   "--nested", "8", "--out", str(tmp_path / "n")])
    assert res.exit_code != 0 and "--nested" in res.output, res.output
