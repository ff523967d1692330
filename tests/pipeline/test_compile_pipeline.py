"""moec compile in memory: one checkpoint load for profile + search + pack + build, no ONNX unless asked."""

from __future__ import annotations

import json

import pytest

from moec import api
from moec.models import checkpoint
from moec.pipeline import compile as compile_stage
from moec.pipeline import profile as profile_stage

pytestmark = pytest.mark.tvm


@pytest.fixture
def count_loads(monkeypatch):
    """Count checkpoint loads made by the pipeline stages (and fail if any stage writes ONNX)."""
    calls = []

    def load(path):
        calls.append(str(path))
        return checkpoint.load_checkpoint(path)

    for module in (compile_stage, profile_stage):  # search reads shapes only (a meta model), never weights
        monkeypatch.setattr(module, "load_checkpoint", load)

    def no_onnx(*args, **kwargs):
        raise AssertionError("compile wrote ONNX without --onnx")

    monkeypatch.setattr(compile_stage, "export_weights", no_onnx)
    return calls


def test_profile_search_and_build_load_the_checkpoint_once(tiny_checkpoint, text_file, tmp_path, count_loads):
    scfg = api.SearchConfig(tiny_checkpoint, policy="greedy", group_size=32, progress=False)
    cfg = api.CompileConfig(tiny_checkpoint, tmp_path / "b", data=api.DataConfig(text_file, seq_len=16),
                            group_size=32, search=scfg)
    stages = []
    bundle = api.compile_bundle(cfg, on_stage=lambda name, s: stages.append(name))
    assert count_loads == [str(tiny_checkpoint)]
    assert stages[:3] == ["profile", "plan (search greedy)", "quantize + pack"] and "export (ONNX)" not in stages
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["plan"]["provenance"]["policy"] == "greedy" and "profile.json" in manifest["files"]
    assert manifest["source"] == str(tiny_checkpoint)
