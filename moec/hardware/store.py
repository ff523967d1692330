"""Measurement store: SQLite keyed by target, device key, candidate fingerprint, moec and TVM versions.

Every measurement is committed (``put``) before the profiler hands it to anyone, so a killed
search loses nothing it already paid device time for. ``ok`` and ``timeout`` rows are final
for their key; an ``error`` row is kept for the record but measured again when asked.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from moec.core.errors import MoecError

SCHEMA = """
CREATE TABLE IF NOT EXISTS measurements (
    target TEXT NOT NULL,
    device_key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    moec_version TEXT NOT NULL,
    tvm_version TEXT NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('ok', 'timeout', 'error')),
    median_s REAL,
    spread_s REAL,
    best_s REAL,
    samples_json TEXT NOT NULL,
    energy_j_per_token REAL,
    energy_source TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    device TEXT,
    detail TEXT,
    label TEXT,
    created_at REAL NOT NULL,
    PRIMARY KEY (target, device_key, fingerprint, moec_version, tvm_version)
)
"""

CLAIMS = """
CREATE TABLE IF NOT EXISTS claims (
    target TEXT NOT NULL,
    device_key TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    moec_version TEXT NOT NULL,
    tvm_version TEXT NOT NULL,
    owner TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (target, device_key, fingerprint, moec_version, tvm_version)
)
"""

COLUMNS = ("target", "device_key", "fingerprint", "moec_version", "tvm_version", "kind", "status", "median_s",
           "spread_s", "best_s", "samples_json", "energy_j_per_token", "energy_source", "attempts", "device",
           "detail", "label", "created_at")


@dataclass
class Measurement:
    """One candidate measured on one device key (latencies in seconds per call / decode step)."""

    target: str
    device_key: str
    fingerprint: str
    kind: str                       # "bundle" (decode step) or "kernel" (one GEMV call)
    status: str                     # "ok", "timeout" or "error"
    median_s: float | None
    spread_s: float | None          # interquartile range over repeats
    best_s: float | None = None     # fastest estimate (bundles: mean over steps of each step's fastest repeat)
    samples: list[float] = field(default_factory=list)
    energy_j_per_token: float | None = None  # bundles: per decode step (token); kernels: per call
    energy_source: str = "modelled"  # "measured" (device sensors) or "modelled" (preset energy model)
    attempts: int = 1
    device: str = ""                # address of the server that produced it
    detail: str = ""
    label: str = ""
    moec_version: str = ""
    tvm_version: str = ""
    created_at: float = 0.0
    from_store: bool = False


def claim_owner() -> str:
    """This process as a claim owner: ``host:pid:random``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _owner_alive(owner: str) -> bool:
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return True  # another machine: trust the expiry time
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def versions() -> tuple[str, str]:
    import tvm

    import moec
    return moec.__version__, tvm.__version__


class MeasurementStore:
    """Thread-safe store of measurements in the SQLite file ``path``."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(SCHEMA)
            self._db.execute(CLAIMS)
            have = {row[1] for row in self._db.execute("PRAGMA table_info(measurements)")}
            if "best_s" not in have:  # a store written before best_s existed
                self._db.execute("ALTER TABLE measurements ADD COLUMN best_s REAL")
            self._db.commit()
        except sqlite3.DatabaseError as exc:
            raise MoecError(f"measurement store '{path}' cannot be opened: {exc}") from None
        except OSError as exc:
            raise MoecError(f"measurement store '{path}' cannot be created: {exc.strerror}") from None
        self._lock = threading.Lock()
        self.moec_version, self.tvm_version = versions()

    def get(self, target: str, device_key: str, fingerprint: str, include_errors: bool = False) -> Measurement | None:
        """The stored final measurement for this key under the running moec/TVM versions, if any."""
        with self._lock:
            row = self._db.execute(
                "SELECT kind, status, median_s, spread_s, best_s, samples_json, energy_j_per_token, energy_source,"
                " attempts, device, detail, label, created_at FROM measurements WHERE target=? AND device_key=?"
                " AND fingerprint=? AND moec_version=? AND tvm_version=?",
                (target, device_key, fingerprint, self.moec_version, self.tvm_version)).fetchone()
        if row is None or (row[1] == "error" and not include_errors):
            return None
        kind, status, med, spread, best, samples, energy, source, attempts, device, detail, label, created = row
        return Measurement(target, device_key, fingerprint, kind, status, med, spread, best, json.loads(samples),
                           energy, source, attempts, device or "", detail or "", label or "", self.moec_version,
                           self.tvm_version, created, from_store=True)

    def put(self, m: Measurement) -> None:
        """Commit ``m`` (replacing an earlier row for the same key)."""
        m.moec_version, m.tvm_version = self.moec_version, self.tvm_version
        with self._lock:
            self._db.execute(
                f"INSERT OR REPLACE INTO measurements ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
                (m.target, m.device_key, m.fingerprint, m.moec_version, m.tvm_version, m.kind, m.status, m.median_s,
                 m.spread_s, m.best_s, json.dumps(m.samples), m.energy_j_per_token, m.energy_source, m.attempts,
                 m.device, m.detail, m.label, m.created_at))
            self._db.commit()

    # -- claims: two profilers on one store never measure the same candidate twice ----------
    def claim(self, target: str, device_key: str, fingerprint: str, owner: str, ttl_s: float) -> bool:
        """Claim the measurement of this key for ``owner`` for ``ttl_s`` seconds; False if another
        live owner holds an unexpired claim (its process, when on this host, must still exist)."""
        key = (target, device_key, fingerprint, self.moec_version, self.tvm_version)
        now = time.time()
        with self._lock:
            try:
                self._db.commit()
                self._db.execute("BEGIN IMMEDIATE")
                row = self._db.execute("SELECT owner, expires_at FROM claims WHERE target=? AND device_key=? AND "
                                       "fingerprint=? AND moec_version=? AND tvm_version=?", key).fetchone()
                if row is not None and row[0] != owner and row[1] > now and _owner_alive(row[0]):
                    self._db.rollback()
                    return False
                self._db.execute("INSERT OR REPLACE INTO claims VALUES (?, ?, ?, ?, ?, ?, ?)", (*key, owner, now + ttl_s))
                self._db.commit()
                return True
            except sqlite3.DatabaseError as exc:
                self._db.rollback()
                raise MoecError(f"measurement store '{self.path}': cannot claim a measurement: {exc}") from None

    def release(self, target: str, device_key: str, fingerprint: str, owner: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM claims WHERE target=? AND device_key=? AND fingerprint=? AND moec_version=?"
                             " AND tvm_version=? AND owner=?",
                             (target, device_key, fingerprint, self.moec_version, self.tvm_version, owner))
            self._db.commit()

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM measurements").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
