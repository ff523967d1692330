"""Bad inputs a new user would try each end in a one-line error and a non-zero exit."""

from __future__ import annotations

import json

import pytest

from tests.cli_helpers import assert_one_line_error, run




def test_help_lists_every_stage():
    code, out = run("--help")
    assert code == 0
    for name in ["profile", "eval", "search", "export", "build", "compile", "run", "inspect", "targets", "farm"]:
        assert name in out


def test_missing_directory(tmp_path, text_file):
    assert_one_line_error(*run("eval", tmp_path / "nope", "--data", text_file), "does not exist")


def test_config_without_moe_fields(tiny_checkpoint, text_file):
    cfg_file = tiny_checkpoint / "config.json"
    cfg = json.loads(cfg_file.read_text())
    del cfg["num_local_experts"]
    cfg_file.write_text(json.dumps(cfg))
    assert_one_line_error(*run("eval", tiny_checkpoint, "--data", text_file), "num_local_experts")


def test_truncated_safetensors(tiny_checkpoint, text_file):
    f = tiny_checkpoint / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert_one_line_error(*run("profile", tiny_checkpoint, "--data", text_file), "truncated")


def test_unknown_architecture(tiny_checkpoint, text_file):
    cfg_file = tiny_checkpoint / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    cfg_file.write_text(json.dumps(cfg))
    code, out = run("eval", tiny_checkpoint, "--data", text_file)
    assert_one_line_error(code, out, "unknown architecture 'GPT2LMHeadModel'")
    assert "MixtralForCausalLM" in out and "OlmoeForCausalLM" in out


def test_empty_data_file(tiny_checkpoint, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert_one_line_error(*run("eval", tiny_checkpoint, "--data", empty), "empty")


def test_missing_data_file(tiny_checkpoint, tmp_path):
    assert_one_line_error(*run("eval", tiny_checkpoint, "--data", tmp_path / "none.txt"), "does not exist")


def test_pickle_only_checkpoint(tiny_checkpoint, text_file):
    (tiny_checkpoint / "model.safetensors").rename(tiny_checkpoint / "pytorch_model.bin")
    assert_one_line_error(*run("eval", tiny_checkpoint, "--data", text_file), "pickle")


def test_missing_shard(tiny_checkpoint, text_file):
    (tiny_checkpoint / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    assert_one_line_error(*run("eval", tiny_checkpoint, "--data", text_file), "missing")
