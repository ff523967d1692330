"""Measurement store: keys, final statuses, persistence; stored candidates cost no device time."""

from __future__ import annotations

import sqlite3
import time

import pytest

from moec.core.errors import MoecError
from moec.hardware.candidates import Protocol
from moec.hardware.device_timing import DeviceTimer, spread
from moec.hardware.store import Measurement, MeasurementStore


def _m(fp: str, status: str = "ok", med: float | None = 1e-3, key: str = "host") -> Measurement:
    return Measurement("host", key, fp, "kernel", status, med, 1e-4 if med else None, med, [med] * 3 if med else [],
                       2e-6, "modelled", 1, "127.0.0.1:9000", "", "k", created_at=time.time())


def test_put_get_round_trip_and_persistence(tmp_path):
    path = tmp_path / "m.db"
    s = MeasurementStore(path)
    s.put(_m("a"))
    s.put(_m("b", "timeout", None))
    s.close()
    s = MeasurementStore(path)
    a = s.get("host", "host", "a")
    assert a.from_store and a.status == "ok" and a.median_s == 1e-3 and a.samples == [1e-3] * 3
    assert s.get("host", "host", "b").status == "timeout"  # a timeout is final: never measured again
    assert s.get("host", "other-key", "a") is None and s.get("jetson", "host", "a") is None


def test_errors_are_kept_but_measured_again(tmp_path):
    s = MeasurementStore(tmp_path / "m.db")
    s.put(_m("e", "error", None))
    assert s.get("host", "host", "e") is None
    assert s.get("host", "host", "e", include_errors=True).status == "error"


def test_versions_are_part_of_the_key(tmp_path):
    s = MeasurementStore(tmp_path / "m.db")
    s.put(_m("a"))
    with sqlite3.connect(tmp_path / "m.db") as db:
        db.execute("UPDATE measurements SET tvm_version = 'older'")
    assert s.get("host", "host", "a") is None


def test_bad_store_file_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"not a database" * 100)
    with pytest.raises(MoecError, match="cannot be opened"):
        MeasurementStore(bad)


class _FakeCandidate:
    """A candidate whose run would fail loudly: only the store may answer for it."""

    kind, target, label = "kernel", "host", "fake"

    def __init__(self, fp: str) -> None:
        self.fp = fp

    def fingerprint(self, protocol: Protocol) -> str:
        return self.fp

    def prepare(self, workdir):
        raise AssertionError("a stored candidate must not be built")

    def run(self, *args):
        raise AssertionError("a stored candidate must not be run")


def test_stored_candidates_need_no_tracker(tmp_path):
    s = MeasurementStore(tmp_path / "m.db")
    for fp in "xyz":
        s.put(_m(fp))
    prof = DeviceTimer("127.0.0.1:1", "host", s)  # nothing listens there
    res = prof.measure([_FakeCandidate(fp) for fp in "xyz"])
    assert [r.fingerprint for r in res] == list("xyz") and all(r.from_store for r in res)
    assert prof.device_requests == 0
    with pytest.raises(MoecError, match="cannot reach the RPC tracker"):
        DeviceTimer("127.0.0.1:1", "host", s, connect_wait_s=1).measure([_FakeCandidate("new")])


def test_spread_is_median_and_iqr():
    med, iqr = spread([1, 2, 3, 4, 100])
    assert med == 3 and iqr == 2
