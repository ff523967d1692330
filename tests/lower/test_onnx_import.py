"""Import of moec ONNX exports for the TVM back end: plan and packed weights come back bit-exactly."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from moec.cli.main import cli
from moec.core.errors import MoecError
from moec.lower.onnx_import import import_onnx
from moec.models.checkpoint import load_checkpoint
from moec.quant.packed_model import fake_quantize_model, pack_model
from moec.core.plan import BitPlan, resolve_plan


def _mixed(cfg) -> BitPlan:
    bits = [2, 3, 4, 8, 16]
    experts = {l: {e: bits[(l + 2 * e) % 5] for e in range(cfg.num_experts)} for l in cfg.moe_layers}
    return BitPlan(experts, {"attention": 4, "lm_head": 8, "embeddings": 3}, group_size=32,
                   model_fingerprint=cfg.fingerprint())


@pytest.fixture
def exported(tiny_checkpoint, tmp_path):
    model = load_checkpoint(tiny_checkpoint)
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps(_mixed(model.cfg).to_json()))
    res = CliRunner().invoke(cli, ["export", str(tiny_checkpoint), "--plan", str(plan_file), "--out",
                                   str(tmp_path / "onnx")])
    assert res.exit_code == 0, res.output
    return tiny_checkpoint, plan_file, tmp_path / "onnx"


def test_import_recovers_plan_and_packed_weights(exported):
    ckpt, plan_file, onnx_dir = exported
    model = load_checkpoint(ckpt)
    cfg, plan, packed, floats = import_onnx(onnx_dir / "decode.onnx")
    assert cfg.fingerprint() == model.cfg.fingerprint()
    assert plan.experts == BitPlan.load(plan_file).experts
    expected = pack_model(model, _mixed(model.cfg))
    assert set(packed) == set(expected)
    for name, pw in expected.items():
        got = packed[name]
        assert got.bits == pw.bits and got.shape == pw.shape
        np.testing.assert_array_equal(got.dequantize(), pw.dequantize())
    assert "norm.weight" in floats and floats["norm.weight"].dtype == np.float32


@pytest.mark.tvm
def test_build_cli_greedy_matches_torch(exported, tmp_path):
    from moec.runtime.session import BundleSession
    ckpt, plan_file, onnx_dir = exported
    res = CliRunner().invoke(cli, ["build", str(onnx_dir), "--target", "host", "--out", str(tmp_path / "bundle")])
    assert res.exit_code == 0, res.output
    model = load_checkpoint(ckpt)
    fake_quantize_model(model, resolve_plan(plan_file, model.cfg))
    sess = BundleSession(tmp_path / "bundle")
    prompt = [3, 14, 15, 92, 6]
    assert sess.generate(prompt, 16)[0] == model.generate_greedy(prompt, 16)


def test_foreign_onnx_is_refused(tmp_path):
    from onnx import TensorProto, helper
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(g), tmp_path / "m.onnx")
    with pytest.raises(MoecError, match="not exported by moec"):
        import_onnx(tmp_path / "m.onnx")
    res = CliRunner().invoke(cli, ["build", str(tmp_path / "nope.onnx"), "--out", str(tmp_path / "b")])
    assert res.exit_code != 0 and "does not exist" in res.output
