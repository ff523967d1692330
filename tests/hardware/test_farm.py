"""A real local farm (stock tracker + RPC server processes): status, faults, timeouts, device-side energy.

One farm of two servers serves the module; the tests run in file order (the fault test kills
one of the servers).
"""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
from click.testing import CliRunner

from moec.cli.main import cli
from moec.hardware.candidates import BundleCandidate, KernelCandidate, Protocol
from moec.hardware.farm import LocalFarm, free_port
from moec.hardware.device_timing import DeviceTimer
from moec.hardware.store import MeasurementStore
from tests.hardware.sensor_fixtures import write_hwmon

pytestmark = [pytest.mark.farm, pytest.mark.tvm, pytest.mark.xdist_group("farm")]  # one farm, on one worker

KEY = "moec-test"


@pytest.fixture(scope="session")
def bundles(tmp_path_factory):
    """Two tiny MoE bundles (uniform 4-bit and 8-bit), built once."""
    from moec.api import CompileConfig, compile_bundle
    from tests.conftest import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("farm-bundles")
    make_tiny_checkpoint(root / "ckpt", seed=1)
    out = []
    for bits in (4, 8):
        out.append(compile_bundle(CompileConfig(checkpoint=root / "ckpt", out=root / f"b{bits}",
                                                plan=f"uniform:{bits}", group_size=32, method="rtn")))
    return out


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    f = LocalFarm(servers=2, key=KEY, log_dir=tmp_path_factory.mktemp("farm-logs"))
    f.start(wait_s=120)
    yield f
    f.stop()
    for p in [f.tracker_proc, *f.servers]:
        assert p.poll() is not None


def _kernels(n: int) -> list[KernelCandidate]:
    shapes = [(b, m) for b in (2, 3, 4, 8, 16) for m in (1, 2)]
    return [KernelCandidate(b, 64, 64, 32, 4, 2, m) for b, m in shapes[:n]]


def test_status_lists_the_servers(farm):
    res = CliRunner().invoke(cli, ["farm", "status", "--tracker", farm.address])
    assert res.exit_code == 0, res.output
    row = next(line for line in res.output.splitlines() if line.startswith(KEY))
    assert row.split()[1:4] == ["2", "2", "0"]  # total, free, pending


def test_unreachable_tracker_is_a_bounded_one_line_error():
    port = free_port()
    t0 = time.monotonic()
    res = CliRunner().invoke(cli, ["farm", "status", "--tracker", f"127.0.0.1:{port}", "--wait", "1"])
    assert res.exit_code == 2 and time.monotonic() - t0 < 10
    assert res.output.strip().count("\n") == 0 and "cannot reach the RPC tracker" in res.output


def test_killed_server_mid_batch_loses_nothing(farm, bundles, tmp_path):
    store = MeasurementStore(tmp_path / "m.db")
    cands = [BundleCandidate(b) for b in bundles] + _kernels(6)
    committed: list[str] = []
    prof = DeviceTimer(farm.address, KEY, store, Protocol(number=5, repeat=40, steps=6), timeout_s=60, wait_s=60,
                    on_result=lambda m: committed.append(m.fingerprint))
    killed: dict = {}

    def killer():  # once a result is stored, kill the server of a measurement in flight
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            busy = [a for a in list(prof.in_flight.values()) if a]
            if committed and busy:
                port = int(busy[0].rsplit(":", 1)[1])
                idx = farm.server_ports.index(port)
                before = list(committed)
                farm.kill_server(idx)
                killed.update(index=idx, port=port, before=before)
            time.sleep(0.01)

    th = threading.Thread(target=killer)
    th.start()
    res = prof.measure(cands)
    th.join()
    assert killed, "no measurement was in flight to interrupt"
    assert farm.servers[killed["index"]].poll() is not None
    assert len(res) == len(cands) and all(m.status == "ok" and m.median_s > 0 for m in res)
    assert prof.retries >= 1 and any(m.attempts >= 2 for m in res)
    dead = f"127.0.0.1:{killed['port']}"
    assert all(m.device != dead for m in res if m.attempts >= 2)  # retried on another device
    for fp in killed["before"]:  # measured before the kill: still stored, unchanged
        assert store.get("host", KEY, fp) is not None
    assert all(m.energy_source == "modelled" and m.energy_j_per_token > 0 for m in res)  # no sensors here

    again = DeviceTimer(farm.address, KEY, store, Protocol(number=5, repeat=40, steps=6))
    res2 = again.measure(cands)
    assert again.device_requests == 0 and all(m.from_store for m in res2)
    assert [m.median_s for m in res2] == [m.median_s for m in res]


def test_timeout_is_recorded_not_retried(farm, tmp_path):
    store = MeasurementStore(tmp_path / "m.db")
    slow = KernelCandidate(16, 64, 64, 32, 4, 2, 2, label="slow")
    prof = DeviceTimer(farm.address, KEY, store, Protocol(number=5, repeat=2000), timeout_s=3, wait_s=60)
    (m,) = prof.measure([slow])
    assert m.status == "timeout" and m.attempts == 1 and m.median_s is None
    assert store.get("host", KEY, m.fingerprint).status == "timeout"
    again = DeviceTimer(farm.address, KEY, store, Protocol(number=5, repeat=2000), timeout_s=3)
    assert again.measure([slow])[0].status == "timeout" and again.device_requests == 0


def test_device_side_sampler_measures_energy(farm, bundles, tmp_path):
    sysroot = tmp_path / "sysroot"
    write_hwmon(sysroot, [("VDD_IN", 5000, 2000)])  # the device's sensor reads 10 W
    store = MeasurementStore(tmp_path / "m.db")
    prof = DeviceTimer(farm.address, KEY, store, Protocol(number=5, repeat=20, steps=4), energy_root=str(sysroot))
    (m,) = prof.measure([BundleCandidate(bundles[0])])
    assert m.status == "ok" and m.energy_source == "measured", m.detail
    assert m.energy_j_per_token == pytest.approx(10.0 * m.median_s, rel=0.05)
    assert "power samples" in m.detail and "VDD_IN" in m.detail


def test_cli_profile_uses_the_store(farm, bundles, tmp_path):
    args = ["farm", "profile", str(bundles[0]), "--tracker", farm.address, "--key", KEY,
            "--store", str(tmp_path / "m.db"), "--repeats", "3", "--steps", "2"]
    first = CliRunner().invoke(cli, args + ["--kernels"])
    assert first.exit_code == 0, first.output
    assert "kernel classes of" in first.output and "expert" in first.output and "dense" in first.output
    second = CliRunner().invoke(cli, args)
    assert second.exit_code == 0 and "store" in second.output.splitlines()[-1]


def test_detached_farm_up_and_down(tmp_path):
    state = tmp_path / "farm.json"
    res = CliRunner().invoke(cli, ["farm", "up", "--servers", "1", "--key", "detached", "--detach",
                                   "--state", str(state)])
    assert res.exit_code == 0, res.output
    pids = json.loads(state.read_text())
    res = CliRunner().invoke(cli, ["farm", "down", "--state", str(state)])
    assert res.exit_code == 0, res.output
    assert not state.exists()
    from moec.hardware.farm import _is_ours
    assert not any(_is_ours(pid) for pid in [pids["tracker_pid"], *pids["server_pids"]])
