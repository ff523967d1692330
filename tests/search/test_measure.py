"""Hardware in the loop on a real device: the local measurer compiles plans into host bundles and times decode."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from moec.cli.main import cli

pytestmark = pytest.mark.tvm


def test_search_with_local_measurements(tiny_profiled, tmp_path):
    ckpt, _, prof = tiny_profiled
    out, state = tmp_path / "plan.json", tmp_path / "state.json"
    res = CliRunner().invoke(cli, ["search", str(ckpt), "--profile", str(prof), "--budget-mb", "0.1", "--episodes",
                                   "8", "--measure", "local", "--measure-every", "4", "--state", str(state),
                                   "--tensor-bits", "re:.*=8", "--out", str(out)])
    assert res.exit_code == 0, res.output
    prov = json.loads(out.read_text())["provenance"]
    assert prov["device_measurements"] >= 1
    assert 0 < prov["measured_latency_ms"] < 1000
    assert "corrected" in prov["latency_source"]
    saved = json.loads(state.read_text())
    assert saved["measured"] and saved["corrections"][0]["measured_s"] > 0
    bundles = list((tmp_path / "state.d" / "bundles").iterdir())
    assert bundles and all((b / "manifest.json").is_file() for b in bundles)
