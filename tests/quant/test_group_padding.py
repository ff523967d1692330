"""Intermediate widths the group size does not divide: zero-padded once, the same in torch, ONNX and TVM."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moec.core.errors import MoecError
from moec.models.checkpoint import load_checkpoint
from moec.quant.packed_model import fake_quantize_model
from moec.quant.padding import pad_for_groups
from moec.core.plan import resolve_plan
from tests.cli_helpers import assert_one_line_error, run
from tests.conftest import make_tiny_checkpoint


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    root = tmp_path_factory.mktemp("odd")
    make_tiny_checkpoint(root / "ckpt", seed=5, expert_intermediate=40)  # 40 = 2.5 groups of 16
    return root


def _padded(ckpt, bits=4):
    model = load_checkpoint(ckpt)
    plan = resolve_plan(f"uniform:{bits}", model.cfg, group_size=16, pad_ok=True)
    return model, *pad_for_groups(model, plan)


def test_padding_keeps_the_float_model_exactly(odd):
    model, padded, plan = _padded(odd / "ckpt")
    assert padded.cfg.expert_intermediate == 48 and plan.model_fingerprint == padded.cfg.fingerprint()
    assert plan.provenance["padded_from"]["expert_intermediate"] == 40
    ids = torch.tensor([[5, 17, 42, 9, 77, 3, 120, 64]])
    with torch.no_grad():
        assert torch.allclose(model(ids), padded(ids), atol=1e-6, rtol=0)
    w2 = padded.layers[0].mlp.w2  # [E, H, 48]: the last group is 8 real channels + 8 zeros
    assert torch.count_nonzero(w2[..., 40:]) == 0
    with pytest.raises(MoecError, match="--group-size"):
        resolve_plan("uniform:4", model.cfg, group_size=16)  # without padding it stays an error


def test_hidden_width_is_still_refused_naming_the_weight(tmp_path, text_file):
    make_tiny_checkpoint(tmp_path / "h", hidden_size=40, num_heads=4, num_kv_heads=2)
    code, out = run("eval", tmp_path / "h", "--data", text_file, "--plan", "uniform:4", "--group-size", 16)
    assert_one_line_error(code, out, "--group-size")
    assert "input width 40" in out


def test_eval_and_onnx_export_agree_with_the_padded_fake_quant(odd, text_file, tmp_path):
    code, out = run("eval", odd / "ckpt", "--data", text_file, "--plan", "uniform:3", "--group-size", 16, "--json")
    assert code == 0, out
    code, out = run("export", odd / "ckpt", "--plan", "uniform:3", "--group-size", 16, "--out", tmp_path / "o",
                    "--verify", "--json")
    assert code == 0, out
    assert json.loads(out)["max_abs_diff"] < 1e-3


@pytest.mark.tvm
def test_compiled_bundle_matches_the_padded_fake_quant(odd):
    from moec.runtime.session import BundleSession
    code, out = run("compile", odd / "ckpt", "--plan", "uniform:4", "--group-size", 16, "--out", odd / "b",
                    "--activations", "float32")
    assert code == 0, out
    _, padded, plan = _padded(odd / "ckpt")
    fake_quantize_model(padded, plan)
    with BundleSession(odd / "b") as sess:
        prompt = sess.tokenizer.encode("Experts in a mixture").ids
        got, _ = sess.generate(prompt, 16)
        assert got == padded.generate_greedy(prompt, 16)
        assert sess.manifest["model"]["config"]["expert_intermediate"] == 48
        sess.reset()
        logits = sess.prefill(prompt)
    with torch.no_grad():
        ref = padded(torch.tensor([prompt]))[0, -1].numpy()
    np.testing.assert_allclose(logits, ref, atol=2e-4, rtol=0)
