"""A plan's router temperature reaches the ONNX graph through the packed router weight: onnxruntime
matches a torch model whose router weight was divided by T by hand; dropped experts are refused."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from export_fixtures import GROUP, LOGIT_TOL, PROMPT, feature_model, mixed_plan, torch_logits

from moec import api
from moec.core.errors import MoecError
from moec.export.exporter import export_model
from moec.export.ort_runner import OrtModel
from moec.models.checkpoint import load_checkpoint
from moec.quant.packed_model import fake_quantize_model


def test_router_temperature_is_exported_and_dropping_is_refused(tmp_path, tiny_checkpoint):
    model = feature_model("headnorm_tied_mqa")
    plan = mixed_plan(model.cfg).validate(model.cfg)
    hot = plan.copy()
    hot.router_temperature = 0.25  # sharper routing: changes which experts win on some tokens
    export_model(copy.deepcopy(model), hot.validate(model.cfg), tmp_path / "hot")
    ref = copy.deepcopy(model)
    with torch.no_grad():  # the reference: temperature applied by hand, plan without knobs
        for block in ref.moe_blocks().values():
            block.router.weight.div_(0.25)
    fake_quantize_model(ref, plan)
    logits, _ = OrtModel(tmp_path / "hot", graphs=("prefill",)).prefill(PROMPT)
    assert float(np.abs(logits - torch_logits(ref, PROMPT)).max()) < LOGIT_TOL
    plain = copy.deepcopy(model)
    fake_quantize_model(plain, plan)
    assert float(np.abs(logits - torch_logits(plain, PROMPT)).max()) > 10 * LOGIT_TOL

    cfg = load_checkpoint(tiny_checkpoint).cfg
    p = mixed_plan(cfg)
    p.dropped_experts = {cfg.moe_layers[0]: [1]}
    p.save(tmp_path / "drop.json")
    with pytest.raises(MoecError, match="ONNX export does not support plans with dropped_experts"):
        api.export_onnx(tiny_checkpoint, tmp_path / "drop.json", tmp_path / "never", group_size=GROUP)
    assert not (tmp_path / "never").exists()
