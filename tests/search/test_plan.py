"""BitPlan validation errors, JSON round trip and tensor-key matching."""

from __future__ import annotations

import json

import pytest

from moec.core.errors import MoecError
from moec.core.config import MoEConfig
from moec.core.plan import BitPlan, resolve_plan, uniform_plan

CFG = MoEConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4,
                top_k=2, expert_intermediate=64)


def mixed() -> BitPlan:
    return BitPlan({0: {0: 2, 1: 3, 2: 4, 3: 8}, 1: {0: 16, 1: 4, 2: 2, 3: 3}},
                   {"attention": 8, "lm_head": 8, "re:embed\\..*": 4}, group_size=32,
                   model_fingerprint=CFG.fingerprint())


def test_round_trip(tmp_path):
    p = mixed()
    p.save(tmp_path / "plan.json")
    q = BitPlan.load(tmp_path / "plan.json")
    assert q.to_json() == p.to_json()
    q.validate(CFG)


def test_tensor_keys_match_in_order():
    p = mixed()
    assert p.tensor_bits("layers.0.attn.q_proj.weight") == 8
    assert p.tensor_bits("embed.weight") == 4
    assert p.tensor_bits("layers.1.mlp.router.weight") == 16  # router float by default
    assert uniform_plan(CFG, 3).tensor_bits("layers.1.mlp.router.weight") == 16
    assert uniform_plan(CFG, 3).tensor_bits("lm_head.weight") == 3


@pytest.mark.parametrize("mutate, needle", [
    (lambda d: d["experts"].update({"5": {"0": 4}}), "MoE layer 5"),
    (lambda d: d["experts"]["0"].update({"9": 4}), "expert 9"),
    (lambda d: d["experts"]["0"].update({"0": 7}), "7 bits not allowed"),
    (lambda d: d["experts"]["1"].pop("2"), "no bits"),
    (lambda d: d.update(model_fingerprint="0123456789abcdef"), "another model"),
    (lambda d: d["tensors"].update({"layers.0.attn.nope": 4}), "unknown tensor"),
    (lambda d: d.update(group_size=48), "group size 48"),
])
def test_validation_errors(mutate, needle):
    d = mixed().to_json()
    mutate(d)
    with pytest.raises(MoecError, match=needle):
        BitPlan.from_json(d).validate(CFG)


def test_target_allowed_bits():
    with pytest.raises(MoecError, match="3 bits not allowed"):
        mixed().validate(CFG, allowed=(2, 4, 8, 16))


@pytest.mark.parametrize("text, needle", [
    ("[1, 2]", "not a JSON object"),
    ('{"version": 9, "experts": {}}', "version 9"),
    ('{"version": 1}', "lacks field"),
    ('{"version": 1, "experts": {"0": 4}}', "malformed"),
    ('{"version": 1, "experts": {}, "bitz": 1}', "unknown field"),
    ("{not json", "not valid JSON"),
])
def test_malformed_files(tmp_path, text, needle):
    f = tmp_path / "p.json"
    f.write_text(text)
    with pytest.raises(MoecError, match=needle):
        resolve_plan(f, CFG)


def test_uniform_spec():
    p = resolve_plan("uniform:2", CFG)
    assert {b for l in p.experts.values() for b in l.values()} == {2}
    with pytest.raises(MoecError, match="uniform"):
        resolve_plan("uniform:x", CFG)
    with pytest.raises(MoecError, match="does not exist"):
        resolve_plan("missing.json", CFG)
    assert json.loads(json.dumps(p.to_json()))["provenance"]["policy"] == "uniform-2"
