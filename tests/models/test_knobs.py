"""Architecture knobs of a plan (router temperature, dropped experts): routing against a plain
softmax/top-k reference, byte accounting, the plan's JSON, and one-line refusals."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from moec.core.config import MoEConfig
from moec.core.errors import MoecError
from moec.core.plan import BitPlan, uniform_plan
from moec.models.knobs import apply_knobs, require_no_knobs
from moec.models.model import MoEModel
from moec.quant.accounting import plan_memory
from moec.quant.packed_model import fake_quantize_model

CFG = MoEConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, num_experts=4,
                top_k=2, expert_intermediate=32, rms_eps=1e-5)


def _model() -> MoEModel:
    torch.manual_seed(0)
    m = MoEModel(CFG)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    return m


def _reference_route(router_w: torch.Tensor, x: torch.Tensor, t: float, dropped: list[int]):
    logits = x @ router_w.T / t
    logits[:, dropped] = float("-inf")
    probs = F.softmax(logits, dim=-1)
    w, ids = probs.topk(CFG.top_k, dim=-1)
    if CFG.norm_topk_prob:
        w = w / w.sum(-1, keepdim=True)
    return probs, ids, w


@pytest.mark.parametrize("t,dropped", [(0.5, []), (2.0, [1]), (1.0, [0, 3])])
def test_routing_matches_softmax_topk_reference(t, dropped):
    m = _model()
    block = m.moe_blocks()[0]
    w0 = block.router.weight.detach().clone()
    x = torch.randn(40, CFG.hidden_size)
    plan = uniform_plan(CFG, 16)
    plan.router_temperature, plan.dropped_experts = t, {0: dropped}
    apply_knobs(m, plan.validate(CFG))
    probs, ids, w = block.route(x)
    rp, rids, rw = _reference_route(w0, x, t, dropped)
    torch.testing.assert_close(probs, rp)
    assert torch.equal(ids, rids)
    torch.testing.assert_close(w, rw)
    assert not set(ids.unique().tolist()) & set(dropped)
    for wt in (block.w1, block.w3, block.w2):
        assert not wt[dropped].any()  # removed from the stored weights too


def test_fake_quantize_model_applies_the_knobs_and_accounting_drops_bytes():
    m = _model()
    plan = uniform_plan(CFG, 4, group_size=32).validate(CFG)
    full = plan_memory(m, plan)
    plan.dropped_experts = {0: [2]}
    dropped = plan_memory(m, plan)
    expert_bytes = full.kind_total("experts") // CFG.num_experts
    assert full.total - dropped.total == expert_bytes > 0
    fake_quantize_model(m, plan)
    assert m.moe_blocks()[0].expert_mask[2] == float("-inf")


def test_plan_json_round_trip_and_old_plans_unchanged():
    plan = uniform_plan(CFG, 3, group_size=32)
    assert "router_temperature" not in plan.to_json() and "dropped_experts" not in plan.to_json()
    plan.router_temperature, plan.dropped_experts = 1.5, {0: [3, 1]}
    back = BitPlan.from_json(plan.to_json()).validate(CFG)
    assert back.router_temperature == 1.5 and back.dropped_experts == {0: [1, 3]} and back.has_knobs
    plan.dropped_experts, plan.merged_experts = {}, {0: [(2, 0, 0.25)]}
    back = BitPlan.from_json(plan.to_json()).validate(CFG)
    assert back.merged_experts == {0: [(2, 0, 0.25)]} and back.merged_into(0) == {0: 2}
    assert [back.is_stored(0, e) for e in range(4)] == [False, True, True, True]


def test_merged_pair_serves_both_experts_with_the_averaged_weights():
    m = _model()
    block = m.moe_blocks()[0]
    w = {p: getattr(block, p).detach().clone() for p in ("w1", "w3", "w2")}
    router = block.router.weight.detach().clone()
    plan = uniform_plan(CFG, 16).validate(CFG)
    plan.merged_experts = {0: [(1, 3, 0.25)]}
    fake_quantize_model(m, plan.validate(CFG))  # float16 storage: the merged weights rounded to float16
    x = torch.randn(64, CFG.hidden_size)
    with torch.no_grad():
        got = block(x[None])[0]
    # reference: routing on the untouched logits, expert 3's slots served by the averaged expert 1
    probs = F.softmax(x @ router.half().float().T, dim=-1)
    gw, ids = probs.topk(CFG.top_k, dim=-1)
    gw = gw / gw.sum(-1, keepdim=True)
    avg = {p: (0.75 * w[p][1] + 0.25 * w[p][3]).half().float() for p in w}
    own = {p: w[p].half().float() for p in w}

    def expert(e, v):
        ww = avg if e in (1, 3) else {p: own[p][e] for p in own}
        return (F.silu(v @ ww["w1"].T) * (v @ ww["w3"].T)) @ ww["w2"].T

    ref = torch.stack([sum(gw[t, s] * expert(int(ids[t, s]), x[t]) for s in range(CFG.top_k)) for t in range(len(x))])
    assert (ids == 3).any() and (ids == 1).any()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    assert plan_memory(m, plan).kind_total("experts") * 4 == plan_memory(m, uniform_plan(CFG, 16)).kind_total("experts") * 3


@pytest.mark.parametrize("change,msg", [
    ({"router_temperature": 0.0}, "router_temperature must be a number in"),
    ({"router_temperature": "hot"}, "router_temperature must be a number"),
    ({"dropped_experts": {"0": [0, 1, 2]}}, "at least top-k = 2 must remain"),
    ({"dropped_experts": {"0": [7]}}, "the model has 4 experts"),
    ({"dropped_experts": {"5": [0]}}, "not a MoE layer"),
    ({"dropped_experts": {"0": "1"}}, "must map layer -> list of experts"),
    ({"merged_experts": {"0": [[1, 1, 0.5]]}}, "two different experts"),
    ({"merged_experts": {"0": [[1, 2, 0.5], [2, 3, 0.5]]}}, "expert 2 of layer 0 twice"),
    ({"merged_experts": {"0": [[1, 2, 1.5]]}}, "must be in \\[0, 1\\]"),
    ({"merged_experts": {"0": [[1, 2]]}}, "list of \\[kept expert, absorbed expert, share\\]"),
    ({"merged_experts": {"0": [[1, 2, 0.5]]}, "dropped_experts": {"0": [2]}}, "both drops and merges"),
])
def test_bad_knobs_are_refused_in_one_line(change, msg):
    d = {**uniform_plan(CFG, 3, group_size=32).to_json(), **change}
    with pytest.raises(MoecError, match=msg) as err:
        BitPlan.from_json(d).validate(CFG)
    assert "\n" not in str(err.value)


def test_temperature_is_refused_for_a_router_with_a_logit_bias():
    cfg = dataclasses.replace(CFG, router_logit_bias=True)  # gpt-oss: W / T alone would not scale the logits
    d = {**uniform_plan(cfg, 3, group_size=32).to_json(), "router_temperature": 1.3}
    with pytest.raises(MoecError, match="router without a logit bias"):
        BitPlan.from_json(d).validate(cfg)


def test_back_ends_without_the_knobs_refuse_them():
    plan = uniform_plan(CFG, 3, group_size=32)
    require_no_knobs(plan, "streamed export")  # no knobs: accepted
    plan.router_temperature = 0.8
    with pytest.raises(MoecError, match="streamed export does not support plans with router_temperature"):
        require_no_knobs(plan, "streamed export")
    plan.router_temperature, plan.dropped_experts = 1.0, {0: [1]}
    with pytest.raises(MoecError, match="streamed compile does not support plans with dropped_experts yet: why"):
        require_no_knobs(plan, "streamed compile", ": why")
    plan.dropped_experts, plan.merged_experts = {}, {0: [(0, 1, 0.5)]}
    with pytest.raises(MoecError, match="streamed compile does not support plans with merged_experts"):
        require_no_knobs(plan, "streamed compile")


def test_pack_model_leaves_dropped_experts_out():
    from moec.quant.packed_model import pack_model
    plan = uniform_plan(CFG, 4, group_size=32).validate(CFG)
    plan.dropped_experts = {0: [1, 2]}
    names = set(pack_model(_model(), plan.validate(CFG)))
    assert not any(n.startswith(("layers.0.mlp.experts.1.", "layers.0.mlp.experts.2.")) for n in names)
    assert {f"layers.0.mlp.experts.{e}.{p}" for e in (0, 3) for p in ("w1", "w3", "w2")} <= names


def test_pack_model_packs_the_temperature_into_the_router():
    m = _model()
    plan = uniform_plan(CFG, 4, group_size=32).validate(CFG)
    plan.router_temperature = 2.0
    w0 = m.moe_blocks()[0].router.weight.detach().clone()
    fake_quantize_model(m, plan)  # router is float16 in uniform plans: W / T rounded to float16
    torch.testing.assert_close(m.moe_blocks()[0].router.weight, (w0 / 2.0).half().float())


def test_rare_experts_by_routing_frequency_keeps_top_k():
    import numpy as np

    from moec.profile.stats import ExpertStats, LayerStats
    from moec.search.knobs import rare_experts, rare_pairs, with_knobs
    st = ExpertStats("0" * 16, num_experts=4, top_k=2, tokens=100)
    st.layers[0] = LayerStats.zeros(4)
    st.layers[0].counts = np.array([0.0, 100.0, 3.0, 97.0])
    assert rare_experts(st) == {0: [0]}
    assert rare_experts(st, max_frequency=0.05) == {0: [0, 2]}
    st.layers[0].counts = np.array([0.0, 0.0, 0.0, 200.0])
    assert rare_experts(st) == {0: [0, 1]}  # never more than num_experts - top_k
    assert rare_experts(st, per_layer=1) == {0: [0]}
    plan = with_knobs(uniform_plan(CFG, 4, group_size=32), rare_experts(st), 1.2).validate(CFG)
    assert plan.dropped_experts == {0: [0, 1]} and plan.router_temperature == 1.2
    st.layers[0].counts = np.array([10.0, 100.0, 30.0, 60.0])
    assert rare_pairs(st, 0.35) == {0: [(2, 0, 0.25)]}  # the busier of the two rarest is kept
    assert rare_pairs(st, 0.05) == {}
    plan = with_knobs(plan, {}, merged=rare_pairs(st, 0.35)).validate(CFG)
    assert plan.merged_experts == {0: [(2, 0, 0.25)]} and not plan.dropped_experts


def test_temperature_on_a_router_with_learned_scales_is_refused():
    from moec.finetune.fake_quant import GroupQuant
    from moec.models.learned_quant import LearnedQuant
    from moec.quant.packed_model import pack_model
    m = _model()
    name = "layers.0.mlp.router.weight"
    lq = LearnedQuant(32, model_fingerprint=CFG.fingerprint())
    lq.params[(name, 4)] = GroupQuant(m.moe_blocks()[0].router.weight.detach(), 4, 32, "rtn").export()
    m.learned_quant = lq
    plan = uniform_plan(CFG, 4, group_size=32, router_bits=4).validate(CFG)
    pack_model(m, plan)  # no temperature: the learned router is used
    plan.router_temperature = 2.0
    with pytest.raises(MoecError, match="cannot be applied to a router quantized with learned"):
        pack_model(m, plan)


def test_eval_cli_honours_dropped_experts(tiny_checkpoint, text_file, tmp_path):
    import json

    from click.testing import CliRunner

    from moec.cli.main import cli
    from moec.models.checkpoint import load_config
    cfg = load_config(tiny_checkpoint)
    plan = uniform_plan(cfg, 4, group_size=32)
    plan.save(tmp_path / "plain.json")
    plan.dropped_experts = {cfg.moe_layers[0]: [0]}
    plan.save(tmp_path / "drop.json")
    out = {}
    for name in ("plain", "drop"):
        res = CliRunner().invoke(cli, ["eval", str(tiny_checkpoint), "--data", str(text_file), "--plan",
                                       str(tmp_path / f"{name}.json"), "--seq-len", "32", "--json"])
        assert res.exit_code == 0, res.output
        out[name] = json.loads(res.output)
    assert out["drop"]["weight_bytes"] < out["plain"]["weight_bytes"]
    assert out["drop"]["nll"] != out["plain"]["nll"]
