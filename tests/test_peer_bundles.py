"""The peer benchmark's bundle reuse (benchmarks/peer_bundles.py): a stale bundle in its work directory
is rebuilt, not crashed on; its documented mixed plan stays within 60 % of uniform:8's bytes.
No llama.cpp is involved."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from moec.artifact.bundle import write_bundle
from moec.core.plan import uniform_plan
from moec.models.checkpoint import load_config
from tests.artifact.bundle_fixtures import rewrite_manifest, tiny_manifest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"moec_{name}", BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


peer = _load("peer_bundles")


def _bundle(tmp_path: Path, activations: str = "float32") -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "lib.so").write_bytes(b"not a library: never loaded here")
    (src / "weights.bin").write_bytes(b"\0" * 16)
    return write_bundle(tmp_path / "bundle", {"lib.so": src / "lib.so", "weights.bin": src / "weights.bin"},
                        {**tiny_manifest(), "activations": activations})


def test_current_bundle_is_reused_only_with_its_activations_and_plan(tmp_path):
    bundle = _bundle(tmp_path, "int8")
    plan = tiny_manifest()["plan"]
    assert peer.bundle_is_current(bundle, "int8")
    assert peer.bundle_is_current(bundle, "int8", plan)
    assert not peer.bundle_is_current(bundle, "float32")
    other = json.loads(json.dumps(plan))
    other["experts"]["0"]["1"] = 2
    assert not peer.bundle_is_current(bundle, "int8", other)


def test_stale_or_missing_bundles_are_not_current(tmp_path):
    assert not peer.bundle_is_current(tmp_path / "none", "float32")
    bundle = _bundle(tmp_path)
    assert peer.bundle_is_current(bundle, "float32")  # no 'activations' field means float32
    rewrite_manifest(bundle, lambda m: m.update(format_version=2))  # an older bundle format
    assert not peer.bundle_is_current(bundle, "float32")
    (bundle / "manifest.json").write_text("{")
    assert not peer.bundle_is_current(bundle, "float32")


def test_mixed_plan_is_within_60_percent_of_uniform8_on_olmoe_shapes(tmp_path):
    sys.path.insert(0, str(BENCH))
    try:
        from scale_checkpoint import hf_config
    finally:
        sys.path.remove(str(BENCH))
    ckpt = tmp_path / "olmoe"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(hf_config(1)))  # 1 layer: 44 %, 4 layers: 41 %
    path, data, share = peer.write_mixed_plan(ckpt, tmp_path / "mixed.json")
    assert json.loads(path.read_text()) == data
    cfg = load_config(ckpt)
    assert 0.35 < share <= 0.6
    bits = {b for layer in data["experts"].values() for b in layer.values()}
    assert bits == {2, 4} and data["tensors"] == {"router": 16, "re:.*": 4}
    assert data["model_fingerprint"] == uniform_plan(cfg, 8).model_fingerprint
