"""Checkpoints with integer or non-finite weights, malformed configs and escaping shard indexes are refused in one line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.cli_helpers import assert_one_line_error, run


def _edit_tensor(ckpt, fn):
    f = ckpt / "model.safetensors"
    tensors = load_file(str(f))
    name = sorted(k for k in tensors if "experts.1" in k)[0]
    tensors[name] = fn(tensors[name])
    save_file(tensors, str(f))
    return name


@pytest.mark.parametrize("edit, needle", [
    (lambda t: t.clone().index_put_((torch.tensor([0]),), torch.tensor(float("nan"))), "non-finite"),
    (lambda t: t.clone().fill_(float("inf")), "non-finite"),
    (lambda t: (t * 100).to(torch.int32), "has dtype"),  # the header check names it before any read
])
def test_bad_weights_are_refused(tiny_checkpoint, text_file, edit, needle):
    name = _edit_tensor(tiny_checkpoint, edit)
    for args in (["eval", tiny_checkpoint, "--data", text_file],
                 ["export", tiny_checkpoint, "--plan", "uniform:4", "--out", tiny_checkpoint.parent / "o"]):
        code, out = run(*args)
        assert_one_line_error(code, out, needle)
        assert name in out


@pytest.mark.parametrize("field, value, needle", [
    ("hidden_size", 256.5, "hidden_size must be an integer"),
    ("hidden_size", "256", "hidden_size must be an integer"),
    ("intermediate_size", -64, "expert_intermediate"),
    ("num_attention_heads", 0, "num_heads"),
    ("rope_theta", "big", "rope_theta"),
    ("architectures", "MixtralForCausalLM", "architectures"),
    ("num_local_experts", [4], "num_experts"),
])
def test_malformed_config_is_one_line(tiny_checkpoint, text_file, field, value, needle):
    cfg_file = tiny_checkpoint / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg[field] = value
    cfg_file.write_text(json.dumps(cfg))
    code, out = run("eval", tiny_checkpoint, "--data", text_file)
    assert_one_line_error(code, out, needle)


def test_expert_shape_disagreeing_with_config(tiny_checkpoint, text_file):
    _edit_tensor(tiny_checkpoint, lambda t: t[:, :32].contiguous())
    code, out = run("eval", tiny_checkpoint, "--data", text_file)
    assert_one_line_error(code, out, "config.json implies")  # the header check, before any weight is read


def test_duplicate_keys_in_config_are_refused(tiny_checkpoint, text_file):
    cfg_file = tiny_checkpoint / "config.json"
    cfg_file.write_text(cfg_file.read_text().replace("{", '{"hidden_size": 32,', 1))
    code, out = run("eval", tiny_checkpoint, "--data", text_file)
    assert_one_line_error(code, out, "duplicate key")


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_shard_index_cannot_leave_the_checkpoint(tiny_checkpoint, text_file, shard):
    (tiny_checkpoint / "model.safetensors").rename(tiny_checkpoint.parent / "outside.safetensors")
    (tiny_checkpoint / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": shard}}))
    code, out = run("eval", tiny_checkpoint, "--data", text_file)
    assert_one_line_error(code, out, "outside the checkpoint directory")
