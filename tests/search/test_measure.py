"""Hardware in the loop on a real device: the local measurer compiles plans into host bundles and times decode."""

from __future__ import annotations

import json
import math

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
    assert "corrected" in prov["latency_source"]
    saved = json.loads(state.read_text())
    # the reported latency is the device measurement of the chosen plan, one of those the search took
    assert any(math.isclose(prov["measured_latency_ms"], m["latency_s"] * 1e3) for _, m in saved["measured"])
    assert saved["measured"] and saved["corrections"][0]["measured_s"] > 0
    bundles = list((tmp_path / "state.d" / "bundles").iterdir())
    assert bundles and all((b / "manifest.json").is_file() for b in bundles)


@pytest.mark.farm
def test_search_with_farm_measurements(tiny_profiled, tmp_path):
    """The same loop through the stock TVM tracker: a real local farm, measurements in its store."""
    from moec.hardware.farm import LocalFarm
    from moec.hardware.store import MeasurementStore
    ckpt, _, prof = tiny_profiled
    out, state = tmp_path / "plan.json", tmp_path / "state.json"
    with LocalFarm(servers=1, key="host") as farm:
        res = CliRunner().invoke(cli, ["search", str(ckpt), "--profile", str(prof), "--budget-mb", "0.1",
                                       "--episodes", "8", "--measure", "farm", "--tracker", farm.address,
                                       "--measure-every", "4", "--state", str(state), "--tensor-bits", "re:.*=8",
                                       "--out", str(out)])
    assert res.exit_code == 0, res.output
    prov = json.loads(out.read_text())["provenance"]
    assert prov["device_measurements"] >= 1
    saved = json.loads(state.read_text())
    assert any(math.isclose(prov["measured_latency_ms"], m["latency_s"] * 1e3) for _, m in saved["measured"])
    store = MeasurementStore(tmp_path / "state.d" / "measurements.db")
    try:
        assert store.count() >= 1
    finally:
        store.close()


def test_search_with_the_farm_simulator(tiny_profiled, tmp_path):
    """--estimator simulator: latencies come from a LatencySimulator file and are labelled simulated."""
    from moec.hardware.kernel_classes import dense_weights, expert_kernels
    from moec.hardware.simulator import LatencySimulator
    from moec.models.checkpoint import load_checkpoint
    ckpt, _, prof = tiny_profiled
    cfg = load_checkpoint(ckpt).cfg
    sim = LatencySimulator("host", "host", cfg.fingerprint(), 64, cfg.top_k, base_s=2e-4, per_class_s=1e-5)
    for b in (2, 3, 4, 8, 16):
        for n, k, pe in expert_kernels(cfg):
            sim.expert_s[f"{b},{n},{k},{int(pe)}"] = [1e-6 + 1e-6 * b * m for m in range(cfg.top_k + 1)]
        for _, (n, k) in dense_weights(cfg):
            sim.dense_s[f"{b},{n},{k}"] = 1e-6 * b
    sim.save(tmp_path / "sim.json")
    out = tmp_path / "plan.json"
    res = CliRunner().invoke(cli, ["search", str(ckpt), "--profile", str(prof), "--budget-mb", "0.1", "--episodes",
                                   "8", "--estimator", "simulator", "--simulator", str(tmp_path / "sim.json"),
                                   "--tensor-bits", "re:.*=8", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "simulated" in json.loads(out.read_text())["provenance"]["latency_source"]
