"""Recipes: every shipped recipe loads; strict keys; flags override fields; compile --recipe records the recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from moec.cli.main import cli
from moec.core.errors import MoecError
from moec.core.targets import builtin_names
from moec.pipeline.recipe import check_target, compile_config, load_recipe, resolve

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))


def test_recipes_are_shipped():
    assert {p.stem for p in RECIPES} >= {"reference-host", "raspberry-pi-5", "jetson-agx-orin"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_loads(path):
    r = load_recipe(path)
    assert Path(r.model, "config.json").is_file()
    assert r.data is None or Path(r.data.calibration).is_file()
    if r.target in builtin_names():  # edge presets arrive with the edge-target work
        check_target(r)
    cfg = compile_config(r, "out")
    assert cfg.search.budget_mb == r.budget_mb and cfg.search.policy == r.policy
    assert cfg.recipe["weighting"] == r.weighting


def _write(tmp_path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_unknown_key_names_itself(tmp_path):
    with pytest.raises(MoecError, match="unknown key 'bugdet_mb'"):
        load_recipe(_write(tmp_path, "model: m\nbugdet_mb: 3\n"))
    with pytest.raises(MoecError, match="unknown key 'data.calbration'"):
        load_recipe(_write(tmp_path, "model: m\ndata: {calbration: x}\n"))
    with pytest.raises(MoecError, match="field 'policy'.*unknown policy 'ppo'; choices: uniform"):
        load_recipe(_write(tmp_path, "model: m\npolicy: ppo\n"))
    with pytest.raises(MoecError, match="field 'budget_mb'"):
        load_recipe(_write(tmp_path, "model: m\nbudget_mb: -1\n"))
    with pytest.raises(MoecError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_flags_override_and_paths_are_relative_to_the_recipe(tmp_path):
    r = load_recipe(_write(tmp_path, "model: ckpt\ndata: {calibration: c.txt, max_tokens: 100}\nalpha: 2\n"
                                     "policy: ilp\n"))
    assert r.model == str(tmp_path / "ckpt") and r.data.calibration == str(tmp_path / "c.txt")
    res = resolve(r, {"model": None, "alpha": None, "beta": 0.7, "policy": "greedy", "max_tokens": 50})
    assert (res.alpha, res.beta, res.policy, res.data.max_tokens) == (2, 0.7, "greedy", 50)
    assert res.data.calibration == str(tmp_path / "c.txt")
    with pytest.raises(MoecError, match="no model"):
        resolve(None, {"alpha": 1})


@pytest.mark.tvm
def test_compile_searches_a_plan_from_a_recipe(tiny_profiled, tmp_path):
    ckpt, data, _ = tiny_profiled
    recipe = _write(tmp_path, f"model: {ckpt}\ndata: {{calibration: {data}, max_tokens: 2000, seq_len: 64}}\n"
                              "budget_mb: 0.12\npolicy: rl\nepisodes: 20\ngroup_size: 32\n"
                              "tensor_bits: {router: 16, 're:.*': 8}\n")
    out = tmp_path / "bundle"
    res = CliRunner().invoke(cli, ["compile", "--recipe", str(recipe), "--out", str(out), "--policy", "ilp",
                                   "--beta", "0.5"])
    assert res.exit_code == 0, res.output
    assert "plan (search ilp)" in res.output
    man = json.loads((out / "manifest.json").read_text())
    assert man["recipe"]["policy"] == "ilp" and man["recipe"]["beta"] == 0.5 and man["recipe"]["episodes"] == 20
    assert man["plan"]["provenance"]["policy"] == "ilp" and man["weight_bytes"] <= 0.12e6
    assert "profile.json" in man["files"]


def test_compile_without_plan_or_data_is_a_one_line_error(tiny_profiled, tmp_path):
    ckpt, _, _ = tiny_profiled
    res = CliRunner().invoke(cli, ["compile", str(ckpt), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and res.output.startswith("error:") and "needs calibration text" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()
