"""`moec export` / `moec inspect` from the command line, and bad inputs ending in one-line errors."""

from __future__ import annotations

import json

import pytest
from export_fixtures import GROUP, mixed_plan

from moec.core.errors import MoecError
from moec.export import exporter
from moec.models.checkpoint import load_config
from tests.cli_helpers import assert_one_line_error, run




def leftovers(parent, name="out"):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.") or p.name == name]


def test_export_then_inspect(tiny_checkpoint, tmp_path):
    plan = tmp_path / "plan.json"
    mixed_plan(load_config(tiny_checkpoint)).save(plan)
    code, out = run("export", tiny_checkpoint, "--plan", plan, "--out", tmp_path / "out", "--verify")
    assert code == 0, out
    assert "prefill.onnx" in out and "decode.onnx" in out and "verify: max" in out
    summary = json.loads((tmp_path / "out" / "export.json").read_text())
    assert summary["plan"]["experts"]["0"] == {"0": 2, "1": 3, "2": 4, "3": 8}
    code, out = run("inspect", tmp_path / "out" / "decode.onnx")
    assert code == 0, out
    assert "expert bits (layer x expert)" in out and "annotations match the plan" in out
    assert "average expert bits 5.750" in out  # (2+3+4+8+16+5+6+2)/8
    code, out = run("inspect", tmp_path / "out" / "prefill.onnx", "--json")
    assert code == 0 and json.loads(out)["graph"] == "prefill"
    # re-export over a previous export replaces it atomically
    code, out = run("export", tiny_checkpoint, "--plan", "uniform:8", "--group-size", GROUP, "--out", tmp_path / "out")
    assert code == 0, out
    assert json.loads((tmp_path / "out" / "export.json").read_text())["experts_per_bits"] == {"8": 8}
    assert leftovers(tmp_path) == ["out"]


def test_malformed_plan(tiny_checkpoint, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert_one_line_error(*run("export", tiny_checkpoint, "--plan", bad, "--out", tmp_path / "out"), "not valid JSON")
    bad.write_text(json.dumps({"version": 1, "experts": {"0": {"0": "four"}}}))
    assert_one_line_error(*run("export", tiny_checkpoint, "--plan", bad, "--out", tmp_path / "out"), "malformed")
    assert_one_line_error(*run("export", tiny_checkpoint, "--plan", "uniform:7", "--out", tmp_path / "out"),
                          "7 bits not allowed")
    assert not leftovers(tmp_path)


def test_plan_for_another_model(tiny_checkpoint, tmp_path):
    from tests.conftest import make_tiny_checkpoint

    other = make_tiny_checkpoint(tmp_path / "other", num_experts=8, top_k=2)
    plan = mixed_plan(other)
    plan.experts = {l: {e: 4 for e in range(4)} for l in plan.experts}  # right shape, wrong fingerprint
    plan.save(tmp_path / "plan.json")
    code, out = run("export", tiny_checkpoint, "--plan", tmp_path / "plan.json", "--out", tmp_path / "out")
    assert_one_line_error(code, out, "plan is for another model")
    assert not leftovers(tmp_path)


def test_unwritable_output(tiny_checkpoint, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_one_line_error(*run("export", tiny_checkpoint, "--plan", "uniform:4", "--out", blocker / "out"),
                          "cannot create output directory")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert_one_line_error(*run("export", tiny_checkpoint, "--plan", "uniform:4", "--out", other),
                          "not a moec export directory")
    assert (other / "keep.txt").read_text() == "mine"


def test_read_only_parent(tiny_checkpoint, tmp_path, monkeypatch):
    import os

    ro = tmp_path / "ro"
    ro.mkdir()
    real_access = os.access
    # tests may run as root, which ignores permission bits: simulate a read-only directory
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(ro) else real_access(p, mode))
    assert_one_line_error(*run("export", tiny_checkpoint, "--plan", "uniform:4", "--out", ro / "out"),
                          "is not writable")
    assert list(ro.iterdir()) == []


def test_failure_while_writing_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(exporter, "write_json", broken)
    code, out = run("export", tiny_checkpoint, "--plan", "uniform:4", "--group-size", GROUP, "--out", tmp_path / "out")
    assert_one_line_error(code, out, "No space left on device")
    assert not leftovers(tmp_path)


def test_inspect_bad_inputs(tmp_path):
    assert_one_line_error(*run("inspect", tmp_path / "bundle.tar"), "unsupported file")
    assert_one_line_error(*run("inspect", tmp_path / "missing.onnx"), "does not exist")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\xffnot a protobuf" * 10)
    code, out = run("inspect", junk)
    assert_one_line_error(code, out, "junk.onnx")


def test_inspect_foreign_onnx(tmp_path):
    from onnx import TensorProto, helper, save

    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    save(helper.make_model(g), str(tmp_path / "plain.onnx"))
    assert_one_line_error(*run("inspect", tmp_path / "plain.onnx"), "no moec plan metadata")


def test_api_inspect_dispatch(tmp_path):
    from moec import api

    with pytest.raises(MoecError, match="expected a .onnx model or a bundle"):
        api.inspect_file(tmp_path / "x.json")
