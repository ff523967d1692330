"""Device-farm view of the stock TVM RPC tracker: per-key device status, bounded waits and requests.

The tracker protocol itself (bounded connects, summaries, device requests) is
:mod:`moec.runtime.remote`'s; this module adds what the farm and the profiler need on top:
devices per key (total, free, pending), waiting for servers to register, and requests that
tolerate a tracker that is briefly unreachable. Every wait is bounded: an unreachable tracker,
or a key with no free device for ``wait_s`` seconds, raises a one-line ``MoecError``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from moec.core.errors import MoecError
from moec.runtime.remote import TrackerAddress, request_device_at, tracker_summary

log = logging.getLogger("moec.farm")

DEFAULT_CONNECT_WAIT_S = 10.0

#: Appended to "cannot reach the RPC tracker" errors of the farm commands.
_HINT = "; start one with 'moec farm up' or pass --tracker HOST:PORT"


def connect(addr: str | TrackerAddress, wait_s: float = DEFAULT_CONNECT_WAIT_S) -> TrackerAddress:
    """The tracker at ``addr`` (``HOST:PORT``) once it answers as one; MoecError after ``wait_s``."""
    parsed = TrackerAddress.parse(addr)
    tracker_summary(parsed, timeout=wait_s, wait_s=wait_s, hint=_HINT)
    return parsed


@dataclass
class KeyStatus:
    key: str
    total: int
    free: int
    pending: int
    servers: list[str]


def key_status(summary: dict) -> dict[str, KeyStatus]:
    """Per-key devices from a tracker summary (total registered, free, pending requests)."""
    servers: dict[str, list[str]] = {}
    for item in summary.get("server_info", []):
        key = item["key"].split(":", 1)[1] if item["key"].startswith("server:") else item["key"]
        servers.setdefault(key, []).append(":".join(map(str, item["addr"])))
    out = {}
    for key in sorted(set(servers) | set(summary.get("queue_info", {}))):
        q = summary.get("queue_info", {}).get(key, {"free": 0, "pending": 0})
        addrs = sorted(servers.get(key, []))
        out[key] = KeyStatus(key, len(addrs), int(q["free"]), int(q["pending"]), addrs)
    return out


def tracker_status(addr: str | TrackerAddress, wait_s: float = DEFAULT_CONNECT_WAIT_S) -> dict[str, KeyStatus]:
    """Devices per key on the tracker at ``addr`` (waits up to ``wait_s`` for it to answer)."""
    return key_status(tracker_summary(TrackerAddress.parse(addr), timeout=wait_s, wait_s=wait_s, hint=_HINT))


def wait_for_devices(addr: str, key: str, count: int, wait_s: float) -> KeyStatus:
    """Poll the tracker until ``count`` servers with ``key`` have registered (bounded)."""
    deadline = time.monotonic() + wait_s
    while True:
        status = tracker_status(addr, max(1.0, deadline - time.monotonic())).get(key)
        if status is not None and status.total >= count:
            return status
        if time.monotonic() >= deadline:
            have = status.total if status else 0
            raise MoecError(f"only {have} of {count} RPC server(s) with key '{key}' registered at {addr} "
                            f"after {wait_s:g} s")
        time.sleep(0.3)


def request_device(tracker: str | TrackerAddress, key: str, wait_s: float, session_timeout: float = 0):
    """(RPC session, "host:port") of a free device of ``key``; MoecError if none is free within ``wait_s``.

    ``session_timeout`` (s, 0 = none) lets the server end the session when it runs longer. A
    tracker that does not answer is retried for up to :data:`DEFAULT_CONNECT_WAIT_S` s; the key
    is not checked first (a device that died may come back within the wait).
    """
    return request_device_at(TrackerAddress.parse(tracker), key, wait_s, session_timeout,
                             check_registered=False, connect_wait_s=min(wait_s, DEFAULT_CONNECT_WAIT_S))
