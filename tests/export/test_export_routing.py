"""The decode graph runs only the routed experts, and the plan is recoverable from the file alone."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from export_fixtures import GROUP, PROMPT, mixed_plan

from moec import api
from moec.export.inspect_onnx import inspect_onnx
from moec.export.ort_runner import OrtModel
from moec.models.checkpoint import load_checkpoint
from moec.quant.packed_model import fake_quantize_model
from moec.core.plan import BitPlan


@pytest.fixture
def mixed_export(tiny_checkpoint, tmp_path):
    model = load_checkpoint(tiny_checkpoint)
    plan = mixed_plan(model.cfg)
    plan.save(tmp_path / "plan.json")
    res = api.export_onnx(tiny_checkpoint, tmp_path / "plan.json", tmp_path / "out")
    return model, plan, res.out_dir


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output}


def _ancestor_ops(name: str, producers: dict[str, onnx.NodeProto]) -> set[str]:
    ops, todo, seen = set(), [name], set()
    while todo:
        node = producers.get(todo.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        ops.add(node.op_type)
        todo += list(node.input)
    return ops


def test_expert_weights_are_read_only_inside_routing_guarded_ifs(mixed_export):
    model, plan, out = mixed_export
    m = onnx.load(str(out / "decode.onnx"), load_external_data=False)
    main = m.graph
    expert_inits = {t.name for t in main.initializer if ".experts." in t.name}
    assert expert_inits
    assert not any(i in expert_inits for n in main.node for i in n.input), "expert weight used outside an If"
    producers = _producers(main)
    guarded: dict[tuple[int, int], set[str]] = {}
    for node in main.node:
        if node.op_type != "If":
            continue
        meta = {e.key: e.value for e in node.metadata_props}
        layer, expert = int(meta["layer"]), int(meta["expert"])
        assert int(meta["bits"]) == plan.experts[layer][expert] and int(meta["group_size"]) == GROUP
        # the condition is "expert e is in some token's top-k": derived from the router's TopK
        assert {"TopK", "ScatterElements", "ReduceMax"} <= _ancestor_ops(node.input[0], producers)
        branches = {a.name: a.g for a in node.attribute}
        used = {i for n in branches["then_branch"].node for i in n.input} & expert_inits
        assert not {i for n in branches["else_branch"].node for i in n.input} & expert_inits
        for n in branches["then_branch"].node:  # every node of the branch carries the expert's metadata
            nm = {e.key: e.value for e in n.metadata_props}
            assert (nm["layer"], nm["expert"], nm["bits"]) == (meta["layer"], meta["expert"], meta["bits"])
        guarded[(layer, expert)] = used
    cfg = model.cfg
    assert set(guarded) == {(l, e) for l in cfg.moe_layers for e in range(cfg.num_experts)}
    for (layer, e), used in guarded.items():  # each If reads exactly its own expert's weights
        assert used and all(n.startswith(f"layers.{layer}.mlp.experts.{e}.") for n in used)
    assert set().union(*guarded.values()) == expert_inits


def test_decode_step_executes_only_routed_experts(mixed_export):
    """onnxruntime's profile of one decode step shows expert nodes only for torch's top-k experts."""
    model, plan, out = mixed_export
    fake_quantize_model(model, plan)
    routed: dict[int, set[int]] = {}

    class Observer:
        def on_moe(self, layer, x, probs, topk_idx, *rest):
            routed[layer] = set(topk_idx[-1].tolist())

    cache = model.new_cache()
    with torch.no_grad():
        model(torch.tensor([PROMPT[:-1]]), cache)
        model.set_observer(Observer())
        model(torch.tensor([[PROMPT[-1]]]), cache)
    ort_model = OrtModel(out, profile=True, graphs=("prefill", "decode"))
    _, past = ort_model.prefill(PROMPT[:-1])
    ort_model.step(PROMPT[-1], past)
    events = json.load(open(ort_model.end_profiling()["decode"]))
    ran: dict[int, set[int]] = {}
    for ev in events:
        name = ev.get("name", "")
        if ev.get("cat") == "Node" and (".Gemm" in name or ".MatMulNBits" in name) and ".E" in name:
            layer, expert = name.split(".")[:2]
            ran.setdefault(int(layer[1:]), set()).add(int(expert[1:]))
    assert ran == routed
    assert all(len(v) == model.cfg.top_k for v in ran.values())


def test_plan_and_config_recoverable_from_file(mixed_export):
    model, plan, out = mixed_export
    for g in ("prefill", "decode"):
        ins = inspect_onnx(out / f"{g}.onnx")
        assert ins.graph == g
        assert ins.plan.to_json() == plan.to_json()
        assert ins.cfg == model.cfg
        assert ins.mismatches() == []
        assert ins.if_experts == len(model.cfg.moe_layers) * model.cfg.num_experts
    m = onnx.load(str(out / "decode.onnx"), load_external_data=False)
    props = {e.key: e.value for e in m.metadata_props}
    assert BitPlan.from_json(json.loads(props["moec.plan"])).to_json() == plan.to_json()
    assert json.loads(props["moec.config"])["num_experts"] == model.cfg.num_experts
