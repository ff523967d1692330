"""Plans and recipes are parsed strictly: no coercion, no duplicate keys, regexes compiled up front, bounded input."""

from __future__ import annotations

import json

import pytest

from moec.core.errors import MoecError
from moec.models.checkpoint import load_config
from moec.core.plan import BitPlan, resolve_plan, uniform_plan
from tests.cli_helpers import assert_one_line_error, run


@pytest.fixture
def plan_json(tiny_checkpoint):
    cfg = load_config(tiny_checkpoint)
    return cfg, uniform_plan(cfg, 4).to_json()


def _load(tmp_path, text: str, cfg):
    f = tmp_path / "p.json"
    f.write_text(text)
    return resolve_plan(f, cfg)


def _mutations(p: dict) -> list[tuple[str, str]]:
    txt = json.dumps(p)
    no_fp = {k: v for k, v in p.items() if k != "model_fingerprint"}
    return [
        (json.dumps(no_fp), "lacks field 'model_fingerprint'"),
        (json.dumps({**p, "model_fingerprint": ""}), "model_fingerprint"),
        (txt.replace('"1": {', '"01": {"0": 2}, "1": {', 1), "not a plain decimal"),
        (txt.replace('"1": {', '"\\uff11": {', 1), "not a plain decimal"),
        (txt.replace('"0": 4', '"0": 4, "0": 2', 1), "duplicate key"),
        (json.dumps({**p, "group_size": "64"}), "group_size must be an integer"),
        (json.dumps({**p, "group_size": 64.0}), "group_size must be an integer"),
        (json.dumps({**p, "group_size": True}), "group_size must be an integer"),
        (json.dumps({**p, "tensors": {"re:(": 4}}), "not a valid regex"),
        (json.dumps({**p, "provenance": "x"}), "provenance must be a JSON object"),
        (json.dumps({**p, "method": "magic"}), "unknown method"),
        (json.dumps({**p, "version": True}), "version"),
        ("[" * 100000 + "]" * 100000, "not acceptable JSON"),
        (txt.replace('"group_size": 64', '"group_size": Infinity'), "Infinity"),
        (txt.replace('"group_size": 64', '"group_size": ' + "9" * 5000), "digits"),
        (txt.replace('"group_size": 64', '"group_size": 1e999'), "overflows"),
        (json.dumps({**p, "experts": {"0": {"0": "4"}}}), "bits must be an integer"),
        (json.dumps({**p, "experts": []}), "'experts' must map"),
    ]


def test_malformed_plans_are_one_line_errors(plan_json, tmp_path):
    cfg, p = plan_json
    for text, needle in _mutations(p):
        with pytest.raises(MoecError, match=needle):
            _load(tmp_path, text, cfg)


def test_plan_for_another_model_is_refused(plan_json, tmp_path):
    cfg, p = plan_json
    with pytest.raises(MoecError, match="another model"):
        _load(tmp_path, json.dumps({**p, "model_fingerprint": "0" * 16}), cfg)
    assert _load(tmp_path, json.dumps(p), cfg).experts == BitPlan.from_json(p).experts


def test_cli_plan_errors_are_one_line(plan_json, tiny_checkpoint, text_file, tmp_path):
    _, p = plan_json
    f = tmp_path / "p.json"
    f.write_text(json.dumps({**p, "tensors": {"re:(": 4}}))
    code, out = run("eval", tiny_checkpoint, "--data", text_file, "--plan", f)
    assert_one_line_error(code, out, "not a valid regex")
    code, out = run("export", tiny_checkpoint, "--plan", "uniform:\uff14", "--out", tmp_path / "o")
    assert_one_line_error(code, out, "bad plan spec")


@pytest.mark.parametrize("text, needle", [
    ("model: x\ngroup_size: \"64\"\n", "valid integer"),
    ("model: x\nmodel: y\n", "duplicate key"),
    ("a: &a [1]\nmodel: *a\n", "aliases"),
    ("model: x\ntensor_bits: {\"re:(\": 4}\n", "not a valid regex"),
    ("model: x\nepisodes: 3.0\n", "valid integer"),
    ("model: x\ndata: {calibration: d, max_tokens: \"5\"}\n", "valid integer"),
    ("model: " + "[" * 5000 + "]" * 5000 + "\n", "recipe"),
    ("\xff", "recipe"),
])
def test_malformed_recipes(tmp_path, text, needle):
    from moec.pipeline.recipe import load_recipe
    f = tmp_path / "r.yaml"
    f.write_bytes(text.encode("utf-8", "surrogateescape") if text != "\xff" else b"\xff")
    with pytest.raises(MoecError, match=needle):
        load_recipe(f)
