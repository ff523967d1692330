"""LazyCheckpoint: per-layer reads match the whole-model loader; bad shards fail up front in one line."""

from __future__ import annotations

import gc
import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from moec.cli.main import cli
from moec.core.errors import MoecError
from moec.models.checkpoint import load_checkpoint
from moec.models.lazy import LazyCheckpoint
from tests.conftest import make_tiny_checkpoint


def _reshard(root, dtype=torch.bfloat16, fused: bool = False) -> None:
    """Rewrite ``root``'s single file as two shards + index in ``dtype`` (optionally fused experts)."""
    tensors = load_file(str(root / "model.safetensors"))
    (root / "model.safetensors").unlink()
    if fused:
        cfg = json.loads((root / "config.json").read_text())
        for layer in range(cfg["num_hidden_layers"]):
            m = f"model.layers.{layer}.block_sparse_moe.experts"
            e = cfg["num_local_experts"]
            gate = [tensors.pop(f"{m}.{x}.w1.weight") for x in range(e)]
            up = [tensors.pop(f"{m}.{x}.w3.weight") for x in range(e)]
            tensors[f"{m}.gate_up_proj"] = torch.cat([torch.stack(gate), torch.stack(up)], dim=1)
            tensors[f"{m}.down_proj"] = torch.stack([tensors.pop(f"{m}.{x}.w2.weight") for x in range(e)])
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for fname, part in halves.items():
        save_file({n: tensors[n].to(dtype).contiguous() for n in part}, str(root / fname))
        weight_map.update({n: fname for n in part})
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("dtype,fused", [(torch.bfloat16, False), (torch.float16, True), (torch.float32, False)])
def test_layers_match_whole_model(tmp_path, dtype, fused):
    root = tmp_path / "ck"
    make_tiny_checkpoint(root)
    _reshard(root, dtype, fused)
    whole = load_checkpoint(root).state_dict()
    lazy = LazyCheckpoint(root)
    for i in range(lazy.cfg.num_layers):
        layer = lazy.layer(i)
        for k, v in layer.state_dict().items():
            assert torch.equal(v, whole[f"layers.{i}.{k}"]), k
    for name in ("embed.weight", "norm.weight", "lm_head.weight"):
        assert torch.equal(lazy.tensor(name), whole[name])


def test_layer_tensors_are_released(tiny_checkpoint):
    lazy = LazyCheckpoint(tiny_checkpoint)
    layer = lazy.layer(0)
    held = lazy.live_tensors()
    assert held >= 10  # norms, attention, router and the three expert stacks
    w1 = layer.mlp.w1
    del layer
    gc.collect()
    assert lazy.live_tensors() == 1  # the expert stack w1 still referenced here
    del w1
    gc.collect()
    assert lazy.live_tensors() == 0


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_truncated_shard(tiny_checkpoint):
    f = tiny_checkpoint / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(MoecError) as ei:
        LazyCheckpoint(tiny_checkpoint)
    msg = _one_line(ei)
    assert "model.safetensors is truncated" in msg and "tensor '" in msg
    res = CliRunner().invoke(cli, ["eval", str(tiny_checkpoint), "--data", str(f)])
    assert res.exit_code != 0 and "truncated" in res.output and len(res.output.strip().splitlines()) == 1


def test_missing_shard_and_absent_tensor(tmp_path):
    root = tmp_path / "ck"
    make_tiny_checkpoint(root)
    _reshard(root)
    index = json.loads((root / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.extra.weight"] = "model-00001-of-00002.safetensors"
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(MoecError) as ei:
        LazyCheckpoint(root)
    assert "'model.layers.0.extra.weight'" in _one_line(ei) and "does not contain it" in str(ei.value)
    (root / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(MoecError, match="missing: model-00002-of-00002.safetensors"):
        LazyCheckpoint(root)


def test_shape_disagreeing_with_config(tiny_checkpoint):
    f = tiny_checkpoint / "model.safetensors"
    tensors = load_file(str(f))
    name = "model.layers.1.block_sparse_moe.gate.weight"
    tensors[name] = tensors[name][:, :32].contiguous()
    save_file(tensors, str(f))
    with pytest.raises(MoecError) as ei:
        LazyCheckpoint(tiny_checkpoint)
    msg = _one_line(ei)
    assert name in msg and "model.safetensors" in msg and "[4, 32]" in msg and "[4, 64]" in msg
