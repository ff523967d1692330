"""Greedy generation through the ONNX prefill + decode graphs equals torch generate_greedy (fake-quantized)."""

from __future__ import annotations

import pytest
from export_fixtures import GROUP, PROMPT, feature_model, mixed_plan

from tests.conftest import require_reference

from moec import api
from moec.export.exporter import export_model
from moec.export.ort_runner import OrtModel
from moec.models.checkpoint import load_checkpoint
from moec.quant.packed_model import fake_quantize_model

NEW_TOKENS = 32


@pytest.mark.parametrize("spec", ["uniform:4", "mixed"])
def test_greedy_32_tokens_tiny(tiny_checkpoint, tmp_path, spec):
    model = load_checkpoint(tiny_checkpoint)
    plan = mixed_plan(model.cfg).validate(model.cfg) if spec == "mixed" else api.resolve_plan(spec, model.cfg, GROUP)
    export_model(model, plan, tmp_path / "out")
    fake_quantize_model(model, plan)
    ours = OrtModel(tmp_path / "out").generate_greedy(PROMPT, NEW_TOKENS)
    assert ours == model.generate_greedy(PROMPT, NEW_TOKENS)
    assert len(ours) == NEW_TOKENS


def test_greedy_feature_model(tmp_path):
    model = feature_model("shared_gate_bias_dense_fullnorm")
    plan = mixed_plan(model.cfg).validate(model.cfg)
    export_model(model, plan, tmp_path / "out")
    fake_quantize_model(model, plan)
    assert OrtModel(tmp_path / "out").generate_greedy(PROMPT, NEW_TOKENS) == model.generate_greedy(PROMPT, NEW_TOKENS)


def test_greedy_reference_model(tmp_path):
    """The trained reference model (skipped until reference/checkpoint exists), 4-bit experts."""
    ref = require_reference()
    res = api.export_onnx(ref, "uniform:4", tmp_path / "out", verify=True)
    assert res.max_abs_diff < 1e-3
    model = load_checkpoint(ref)
    fake_quantize_model(model, api.resolve_plan("uniform:4", model.cfg))
    prompt = [int(t) for t in range(1, 17)]
    assert OrtModel(res.out_dir).generate_greedy(prompt, NEW_TOKENS) == model.generate_greedy(prompt, NEW_TOKENS)
