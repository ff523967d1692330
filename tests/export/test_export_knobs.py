"""A plan's router temperature reaches the ONNX graph through the packed router weight: onnxruntime
matches a torch model whose router weight was divided by T by hand. Dropped experts are masked out of the
exported router and stored nowhere; a merged pair stores one averaged expert that serves both experts'
slots. onnxruntime (prefill and cached decode) matches the fake-quantized torch model with the same plan."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import torch
from export_fixtures import GROUP, LOGIT_TOL, PROMPT, feature_model, mixed_plan, torch_logits

from moec import api
from moec.export.exporter import export_model
from moec.export.inspect_onnx import inspect_onnx
from moec.export.ort_runner import OrtModel
from moec.models.checkpoint import load_checkpoint
from moec.quant.accounting import plan_memory, shape_model
from moec.quant.packed_model import fake_quantize_model


def test_router_temperature_is_exported(tmp_path):
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


def test_dropped_and_merged_experts_are_routed_as_in_torch_and_not_stored(tmp_path, tiny_checkpoint):
    cfg = load_checkpoint(tiny_checkpoint).cfg
    plan = mixed_plan(cfg)
    first, last = cfg.moe_layers[0], cfg.moe_layers[-1]
    plan.dropped_experts = {first: [1], last: [0, 2]}
    plan.merged_experts = {first: [(2, 0, 0.3)]}  # expert 0's slots served by the average of 2 and 0
    plan.save(tmp_path / "drop.json")
    res = api.export_onnx(tiny_checkpoint, tmp_path / "drop.json", tmp_path / "drop", group_size=GROUP)
    names = {t.name for t in onnx.load(str(tmp_path / "drop" / "prefill.onnx"), load_external_data=False).graph.initializer}
    for layer, experts in {first: [0, 1], last: [0, 2]}.items():  # dropped or merged away: not stored
        for e in experts:
            assert not any(n.startswith(f"layers.{layer}.mlp.experts.{e}.") for n in names)
    assert any(n.startswith(f"layers.{first}.mlp.experts.2.") for n in names)
    # exactly the plan's accounting, which leaves dropped experts out
    assert res.summary["bytes"]["experts"] == plan_memory(shape_model(cfg), plan.validate(cfg)).kind_total("experts")
    assert inspect_onnx(tmp_path / "drop" / "prefill.onnx").mismatches() == []

    ref = load_checkpoint(tiny_checkpoint)
    fake_quantize_model(ref, plan.validate(ref.cfg))
    ort = OrtModel(tmp_path / "drop")
    logits, past = ort.prefill(PROMPT)
    assert float(np.abs(logits - torch_logits(ref, PROMPT)).max()) < LOGIT_TOL
    plain = load_checkpoint(tiny_checkpoint)
    fake_quantize_model(plain, mixed_plan(cfg).validate(cfg))
    assert float(np.abs(logits - torch_logits(plain, PROMPT)).max()) > 10 * LOGIT_TOL  # the knob changed the model
    step, _ = ort.step(PROMPT[-1], [p[:, :, :-1] for p in past])  # the cached decode graph masks too
    np.testing.assert_allclose(step[0, -1], logits[0, -1], rtol=0, atol=LOGIT_TOL)
    assert ort.generate_greedy(PROMPT, 8) == ref.generate_greedy(PROMPT, 8)
