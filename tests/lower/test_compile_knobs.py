"""A plan's dropped and merged experts in a TVM bundle: dropped ones masked out of the router's choices in the
decode and prefill functions, a merged pair's absorbed expert remapped to the kept one's stack; neither is
stored (no stack holds them), and the bundle's logits and greedy tokens equal the fake-quantized torch
model's with the same plan; the ONNX export of the same compile imports to the same remap."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from moec.cli.main import cli
from moec.models.checkpoint import load_checkpoint
from moec.quant.packed_model import fake_quantize_model
from tests.lower.plan_fixtures import mixed_plan

pytestmark = pytest.mark.tvm


def test_dropped_and_merged_experts_in_the_bundle(tmp_path):
    from moec.artifact.weights_file import WeightsReader
    from moec.lower.onnx_import import import_onnx
    from moec.lower.params import build_params
    from moec.runtime.session import BundleSession
    from tests.conftest import make_tiny_checkpoint
    ckpt = tmp_path / "ckpt"
    cfg = make_tiny_checkpoint(ckpt, seed=5)
    plan = mixed_plan(cfg)  # layer 0: experts at 2/3/4/8 bits, layer 1: 3/4/8/16
    plan.dropped_experts = {0: [1], 1: [3]}  # whole bit classes vanish (3 in layer 0; 3 and 16 in layer 1)
    plan.merged_experts = {1: [(1, 0, 0.4)]}  # expert 0 served by the average of 1 and 0, at expert 1's 4 bits
    plan.save(tmp_path / "drop.json")
    res = CliRunner().invoke(cli, ["compile", str(ckpt), "--plan", str(tmp_path / "drop.json"), "--out",
                                   str(tmp_path / "bundle"), "--target", "host", "--onnx", str(tmp_path / "onnx"),
                                   "--activations", "float32"])
    assert res.exit_code == 0, res.output

    stacks = {}
    for name in WeightsReader(tmp_path / "bundle").order:
        if ".experts.b" in name and ".w1." in name:
            layer, cls = int(name.split(".")[1]), int(name.split(".")[3][1:])
            stacks.setdefault(layer, {})[cls] = WeightsReader(tmp_path / "bundle").array(name).shape[0]
    assert stacks == {0: {2: 1, 4: 1, 8: 1}, 1: {4: 1, 8: 1}}
    _, oplan, packed, floats = import_onnx(tmp_path / "onnx")
    params = build_params(cfg, oplan, packed, floats)
    assert params.class_of[1].tolist() == [4, 4, 8, 0] and params.remap[1].tolist() == [0, 0, 0, -1]

    model = load_checkpoint(ckpt)
    fake_quantize_model(model, plan.validate(model.cfg))
    sess = BundleSession(tmp_path / "bundle")
    prompt = sess.tokenizer.encode("Experts in a mixture").ids
    with torch.no_grad():
        ref = model(torch.tensor([prompt]))[0, -1].numpy()
    np.testing.assert_allclose(np.asarray(sess.prefill(prompt)).reshape(-1), ref, rtol=0, atol=1e-3)
    sess.reset()
    assert sess.generate(prompt, 24)[0] == model.generate_greedy(prompt, 24)
    sess.reset()
    for t in prompt:  # decode steps only: the decode function masks too
        logits = sess.step(t)
    np.testing.assert_allclose(logits.reshape(-1), ref, rtol=0, atol=1e-3)
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["plan"]["dropped_experts"] == {"0": [1], "1": [3]}
    assert manifest["plan"]["merged_experts"] == {"1": [[1, 0, 0.4]]}
