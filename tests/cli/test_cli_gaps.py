"""CLI gaps of a new user (issue 18, point 11): group sizes, float-only plans, one uniform:B, aliases, RPC keys."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from moec.models.checkpoint import load_config
from moec.core.plan import UNIFORM_METHOD, BitPlan, resolve_plan
from moec.search.problem import DEFAULT_TENSORS
from tests.cli_helpers import assert_one_line_error, run
from tests.conftest import REPO, make_tiny_checkpoint


@pytest.fixture
def width48(tmp_path) -> Path:
    make_tiny_checkpoint(tmp_path / "w48", hidden_size=64, expert_intermediate=48)
    return tmp_path / "w48"


def test_eval_and_search_take_group_size(width48, text_file, tmp_path):
    code, out = run("search", width48, "--data", text_file, "--max-tokens", 400, "--policy", "greedy",
                    "--out", tmp_path / "plan.json")  # search does not pad: the default group 64 is refused
    assert_one_line_error(code, out, "--group-size")
    assert "layers.0.mlp.experts.0.w2" in out and "input width 48" in out
    code, out = run("eval", width48, "--data", text_file, "--plan", "uniform:4", "--group-size", 16, "--json")
    assert code == 0, out
    assert json.loads(out)["perplexity"] > 0
    code, out = run("search", width48, "--data", text_file, "--max-tokens", 400, "--policy", "greedy",
                    "--group-size", 16, "--out", tmp_path / "plan.json")
    assert code == 0, out
    assert json.loads((tmp_path / "plan.json").read_text())["group_size"] == 16


def test_float_only_plan_needs_no_divisible_group(width48):
    cfg = load_config(width48)
    experts = {l: {e: 16 for e in range(cfg.num_experts)} for l in cfg.moe_layers}
    BitPlan(experts, {}, group_size=64, model_fingerprint=cfg.fingerprint()).validate(cfg)


def test_uniform_means_one_method_everywhere(tiny_checkpoint, text_file, tmp_path):
    from moec.pipeline.recipe import compile_config, resolve
    cfg = compile_config(resolve(None, {"model": str(tiny_checkpoint)}), tmp_path / "b", "uniform:4")
    assert cfg.method == UNIFORM_METHOD
    assert resolve_plan("uniform:4", load_config(tiny_checkpoint)).method == UNIFORM_METHOD
    code, out = run("export", tiny_checkpoint, "--plan", "uniform:4", "--out", tmp_path / "o")
    assert code == 0, out
    assert json.loads((tmp_path / "o" / "export.json").read_text())["plan"]["method"] == UNIFORM_METHOD
    a = run("eval", tiny_checkpoint, "--data", text_file, "--plan", "uniform:3", "--json")
    b = run("eval", tiny_checkpoint, "--data", text_file, "--plan", "uniform:3", "--method", "rtn", "--json")
    c = run("eval", tiny_checkpoint, "--data", text_file, "--plan", "uniform:3", "--method", UNIFORM_METHOD, "--json")
    assert a[0] == b[0] == c[0] == 0
    assert json.loads(a[1])["perplexity"] == json.loads(c[1])["perplexity"] != json.loads(b[1])["perplexity"]


def test_tensor_bits_help_shows_the_real_default():
    code, out = run("search", "--help")
    flat = " ".join(out.split())
    assert ",".join(f"{k}={v}" for k, v in DEFAULT_TENSORS.items()) in flat


def test_jetson_orin_alias_and_readme_rpc_keys():
    from moec.core.targets import builtin_names, load_target
    assert load_target("jetson-orin").name == "jetson-orin-nano"
    code, out = run("targets", "show", "nonexistent")
    assert "jetson-orin = jetson-orin-nano" in out
    keys = {load_target(n).rpc_key for n in builtin_names()}
    readme = (REPO / "README.md").read_text()
    device_keys = re.findall(r"rpc_device [^\n]*--key (\S+)", readme)
    assert device_keys and set(device_keys) <= keys
