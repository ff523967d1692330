"""Farm hardening: loopback-only binds, down kills whole groups (dead leaders too) and logs,
failed measurements exit non-zero, and store claims keep two profilers off the same candidate."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from moec.hardware.store import Measurement, MeasurementStore
from tests.cli_helpers import assert_one_line_error, run


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.7", "::"])
def test_non_loopback_bind_needs_insecure_bind(host, tmp_path):
    code, out = run("farm", "up", "--host", host, "--state", tmp_path / "s.json")
    assert_one_line_error(code, out, "--insecure-bind")


@pytest.mark.farm
@pytest.mark.tvm
def test_down_kills_groups_whose_leader_died_and_removes_logs(tmp_path):
    from moec.hardware.farm import _group_members
    state = tmp_path / "farm.json"
    code, out = run("farm", "up", "--servers", "1", "--key", "orphans", "--detach", "--state", state)
    assert code == 0, out
    s = json.loads(state.read_text())
    groups = [s["tracker_pid"], *s["server_pids"]]
    deadline = time.time() + 30
    while time.time() < deadline and not all(len(_group_members(g)) > 1 for g in groups):
        time.sleep(0.2)
    orphans = [p for g in groups for p in _group_members(g) if p != g]
    assert orphans, "expected TVM worker processes under each leader"
    for g in groups:  # the leaders die; their workers keep serving
        os.kill(g, signal.SIGKILL)
    time.sleep(0.5)
    assert any(Path(f"/proc/{p}").exists() for p in orphans)
    code, out = run("farm", "down", "--state", state)
    assert code == 0, out
    assert not any(_group_members(g) for g in groups)
    assert not state.exists() and not Path(s["log_dir"]).exists()


def test_failed_measurements_exit_non_zero(tmp_path, monkeypatch):
    import moec.hardware.device_timing as profiler
    bundle = tmp_path / "b"
    bundle.mkdir()
    failed = Measurement("host", "k", "f" * 16, "bundle", "error", None, None, detail="device lost", label="b")
    monkeypatch.setattr(profiler, "measure_bundles", lambda *a, **k: [failed])
    code, out = run("farm", "profile", bundle, "--tracker", "127.0.0.1:1", "--key", "k", "--store", tmp_path / "m.db")
    assert code != 0 and out.splitlines()[-1].startswith("error: 1 measurement(s) failed"), out
    assert "device lost" in out


def test_claims_are_exclusive_and_expire(tmp_path):
    a, b = MeasurementStore(tmp_path / "m.db"), MeasurementStore(tmp_path / "m.db")
    assert a.claim("host", "k", "fp", "other-host:1:x", ttl_s=60)
    assert not b.claim("host", "k", "fp", "other-host:2:y", ttl_s=60)
    assert a.claim("host", "k", "fp", "other-host:1:x", ttl_s=60)  # its own claim: renewed
    a.release("host", "k", "fp", "other-host:1:x")
    assert b.claim("host", "k", "fp", "other-host:2:y", ttl_s=0.01)
    time.sleep(0.05)
    assert a.claim("host", "k", "fp", "other-host:1:x", ttl_s=60)  # expired: taken over
    import socket
    dead = f"{socket.gethostname()}:{2**22 + 12345}:z"  # a pid that does not exist on this host
    assert a.claim("host", "k", "fp2", dead, ttl_s=60)
    assert b.claim("host", "k", "fp2", "other-host:2:y", ttl_s=60)  # its owner is gone: taken over


class _Cand:
    kind, target, label = "kernel", "host", "c"

    def fingerprint(self, protocol):
        return "fp-claimed"


def test_second_profiler_waits_for_the_claimed_measurement(tmp_path, monkeypatch):
    """A candidate another profiler is measuring is not measured again: its stored numbers come back."""
    from moec.hardware.device_timing import DeviceTimer as Profiler
    store = MeasurementStore(tmp_path / "m.db")
    assert store.claim("host", "k", "fp-claimed", "other-host:9:w", ttl_s=60)
    prof = Profiler("127.0.0.1:1", "k", store)
    prof.claim_poll_s = 0.05
    monkeypatch.setattr(prof, "_run_workers", lambda *a: pytest.fail("measured a claimed candidate"))
    stored = Measurement("host", "k", "fp-claimed", "kernel", "ok", 1.5e-3, 1e-5, label="c")

    def other_profiler_finishes():
        time.sleep(0.3)
        MeasurementStore(tmp_path / "m.db").put(stored)

    t = threading.Thread(target=other_profiler_finishes)
    t.start()
    (m,) = prof.measure([_Cand()])
    t.join()
    assert m.from_store and m.median_s == 1.5e-3
