"""Exported graphs pass the ONNX checker and match the fake-quantized torch model in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from export_fixtures import FEATURE_CONFIGS, GROUP, LOGIT_TOL, PROMPT, feature_model, mixed_plan, torch_logits
from onnx import TensorProto, helper

from moec import api
from moec.export.exporter import export_model
from moec.export.onnx_graph import MS_DOMAIN, MS_OPSET, OPSET, GraphBuilder, WeightStore, tensor_info
from moec.export.ort_runner import OrtModel
from moec.export.quantized_matmul import choose_form, embedding, linear, store_weight
from moec.models.checkpoint import load_checkpoint
from moec.quant.packed_model import fake_quantize_model, pack_weight
from moec.core.plan import resolve_plan


def _check_and_compare(out_dir, model, ids=PROMPT) -> float:
    """full_check both graphs; prefill and prefill+decode logits vs torch. Returns the max difference."""
    for g in ("prefill", "decode"):
        onnx.checker.check_model(str(out_dir / f"{g}.onnx"), full_check=True)
    ort_model = OrtModel(out_dir)
    ref = torch_logits(model, ids)
    logits, _ = ort_model.prefill(ids)
    diff = float(np.abs(logits - ref).max())
    _, past = ort_model.prefill(ids[:-1])
    step_logits, present = ort_model.step(ids[-1], past)
    diff = max(diff, float(np.abs(step_logits[0, 0] - ref[0, -1]).max()))
    assert present[0].shape[2] == len(ids)
    assert diff < LOGIT_TOL, diff
    return diff


@pytest.mark.parametrize("spec", ["uniform:4", "uniform:8", "mixed", "uniform:4/group8"])
def test_checkpoint_export_matches_fake_quant(tiny_checkpoint, tmp_path, spec):
    model = load_checkpoint(tiny_checkpoint)
    group = 8 if spec.endswith("group8") else GROUP  # group 8: MatMulNBits refuses it -> in-graph unpack
    plan = spec.split("/")[0]
    if spec == "mixed":
        plan = tmp_path / "plan.json"
        mixed_plan(model.cfg).save(plan)
    res = api.export_onnx(tiny_checkpoint, plan, tmp_path / "out", group_size=group)
    assert {"prefill.onnx", "decode.onnx", "weights.bin", "tokenizer.json", "export.json"} <= set(res.files)
    bit_plan = resolve_plan(plan, model.cfg, group)
    fake_quantize_model(model, bit_plan)
    _check_and_compare(res.out_dir, model)
    assert res.summary["average_expert_bits"] == pytest.approx(bit_plan.average_expert_bits())


@pytest.mark.parametrize("name", sorted(FEATURE_CONFIGS))
def test_feature_models_match(tmp_path, name):
    """Shared expert (+sigmoid gate), qk-norm full/head, bias, dense layers, tied embeddings, top-k modes."""
    model = feature_model(name)
    plan = mixed_plan(model.cfg).validate(model.cfg)
    export_model(model, plan, tmp_path / "out")
    fake_quantize_model(model, plan)
    _check_and_compare(tmp_path / "out", model)


def test_files_hold_no_float_copies_of_quantized_experts(tiny_checkpoint, tmp_path):
    res = api.export_onnx(tiny_checkpoint, "uniform:2", tmp_path / "out", group_size=GROUP)
    m = onnx.load(str(res.out_dir / "decode.onnx"), load_external_data=False)
    for t in m.graph.initializer:
        if ".experts." in t.name:
            assert t.data_type in (TensorProto.UINT8, TensorProto.FLOAT), t.name  # codes/zeros, scales
            if t.data_type == TensorProto.FLOAT:
                assert t.name.endswith(".scales")
    # 2-bit experts: weights.bin is far below the float16 size of the experts alone
    cfg = load_checkpoint(tiny_checkpoint).cfg
    fp16_experts = cfg.num_layers * cfg.num_experts * 3 * cfg.hidden_size * cfg.expert_intermediate * 2
    assert res.summary["bytes"]["experts"] < fp16_experts / 4


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8, 16])
@pytest.mark.parametrize("group", [8, 16, 32])
def test_weight_forms_match_packed_dequantize(bits, group):
    """linear() == x @ dequantize().T and embedding() == dequantize()[ids] for every form."""
    rng = np.random.default_rng(bits * 100 + group)
    n, k = 40, 96
    pw = pack_weight(rng.normal(0, 0.1, (n, k)).astype(np.float32), bits, group)
    store = WeightStore()
    gb = GraphBuilder(store)
    sw = store_weight(store, "w", pw)
    expected_form = {16: "float16"}.get(bits, "matmulnbits" if bits in (2, 4, 8) and group >= 16 else "packed")
    assert sw.form == choose_form(pw) == expected_form
    gb.op("Identity", [linear(gb, "x", sw)], outputs=["y"])
    gb.op("Identity", [embedding(gb, "ids", sw)], outputs=["rows"])
    inits = gb.const_tensors + [onnx.numpy_helper.from_array(a, nm) for nm, a in store.arrays.items()]
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    graph = gb.to_graph("g", [tensor_info("x", f32, ["T", k]), tensor_info("ids", i64, ["R"])],
                        [tensor_info("y", f32, ["T", n]), tensor_info("rows", f32, ["R", k])], inits)
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", OPSET),
                                                                  helper.make_opsetid(MS_DOMAIN, MS_OPSET)])
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = rng.normal(0, 1, (3, k)).astype(np.float32)
    ids = np.array([0, 39, 7, 7], dtype=np.int64)
    y, rows = sess.run(None, {"x": x, "ids": ids})
    deq = pw.dequantize()
    np.testing.assert_array_equal(rows, deq[ids])  # dequantization itself is bit-exact
    np.testing.assert_allclose(y, x @ deq.T, rtol=0, atol=1e-5)


def test_accuracy_level_4_is_recorded_and_close(tiny_checkpoint, tmp_path):
    """accuracy_level 4 (int8 activations in MatMulNBits): faster on CPU, approximate."""
    res = api.export_onnx(tiny_checkpoint, "uniform:8", tmp_path / "out", group_size=GROUP, accuracy_level=4)
    assert res.summary["accuracy_level"] == 4
    from moec.export.inspect_onnx import inspect_onnx

    assert inspect_onnx(res.out_dir / "decode.onnx").accuracy_level == 4
    model = load_checkpoint(tiny_checkpoint)
    fake_quantize_model(model, resolve_plan("uniform:8", model.cfg, GROUP))
    logits, _ = OrtModel(res.out_dir).prefill(PROMPT)
    ref = torch_logits(model, PROMPT)
    assert np.abs(logits - ref).max() < 0.1 * np.abs(ref).max()
    with pytest.raises(api.MoecError, match="accuracy level"):
        api.export_onnx(tiny_checkpoint, "uniform:8", tmp_path / "bad", group_size=GROUP, accuracy_level=7)


@pytest.mark.parametrize("name", ["shared_gate_bias_dense_fullnorm", "mla_qlora_sigmoid_bias"])
def test_random_packed_weights_export_and_run(tmp_path, name):
    """Benchmark path: packed weights generated directly (no float model) export and run."""
    from moec.export.exporter import export_weights
    from moec.quant.weights import random_weights

    model = feature_model(name)
    weights = random_weights(model.cfg, mixed_plan(model.cfg))
    for name, pw in weights.packed.items():
        assert pw.dequantize().shape == pw.shape, name
    export_weights(weights, tmp_path / "out")
    logits, past = OrtModel(tmp_path / "out").prefill(PROMPT)
    assert np.isfinite(logits).all() and past[0].shape[2] == len(PROMPT)
