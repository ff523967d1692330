"""Client side of the stock TVM RPC tracker: bounded connects, per-key summaries, device requests.

Every wait is bounded: an unreachable tracker, or a key with no free device for ``wait_s``
seconds, raises a one-line ``MoecError`` instead of blocking forever (the stock client
retries a dead tracker for 60 s and waits for a device without limit).
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from dataclasses import dataclass

from moec.errors import MoecError

log = logging.getLogger("moec.farm")

DEFAULT_CONNECT_WAIT_S = 10.0


def parse_address(addr: str) -> tuple[str, int]:
    """``HOST:PORT`` → (host, port), with a one-line error for anything else."""
    host, sep, port = str(addr).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise MoecError(f"bad tracker address '{addr}'; expected HOST:PORT, e.g. 127.0.0.1:9190")
    return host, int(port)


def wait_reachable(host: str, port: int, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    last = None
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(2.0, max(wait_s, 0.1))):
                return
        except OSError as exc:
            last = exc
        if time.monotonic() >= deadline:
            reason = getattr(last, "strerror", None) or str(last)
            raise MoecError(f"cannot reach the RPC tracker at {host}:{port} after {wait_s:g} s ({reason}); "
                            f"start one with 'moec farm up' or pass --tracker HOST:PORT")
        time.sleep(0.2)


def connect(addr: str, wait_s: float = DEFAULT_CONNECT_WAIT_S):
    """A ``tvm.rpc.TrackerSession`` to ``addr`` (``HOST:PORT``), or MoecError after ``wait_s``."""
    import tvm.rpc

    host, port = parse_address(addr)
    wait_reachable(host, port, wait_s)
    from tvm.rpc import base
    try:  # the handshake, bounded (the stock client would block on a port that never answers)
        with socket.create_connection((host, port), timeout=wait_s) as sock:
            sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
            magic = struct.unpack("<i", base.recvall(sock, 4))[0]
    except (OSError, RuntimeError, struct.error) as exc:
        raise MoecError(f"{host}:{port} does not answer as an RPC tracker: {exc}") from None
    if magic != base.RPC_TRACKER_MAGIC:
        raise MoecError(f"{host}:{port} is not an RPC tracker")
    try:
        return tvm.rpc.connect_tracker(host, port)
    except (OSError, RuntimeError) as exc:
        raise MoecError(f"{host}:{port} does not answer as an RPC tracker: {str(exc).splitlines()[0]}") from None


@dataclass
class KeyStatus:
    key: str
    total: int
    free: int
    pending: int
    servers: list[str]


def key_status(summary: dict) -> dict[str, KeyStatus]:
    """Per-key devices from a tracker ``summary()`` (total registered, free, pending requests)."""
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


def tracker_status(addr: str, wait_s: float = DEFAULT_CONNECT_WAIT_S) -> dict[str, KeyStatus]:
    """Devices per key on the tracker at ``addr``."""
    tr = connect(addr, wait_s)
    try:
        return key_status(tr.summary())
    except (OSError, RuntimeError) as exc:
        raise MoecError(f"tracker {addr} did not answer a summary request: {exc}") from None
    finally:
        tr.close()


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


def request_device(tracker, key: str, wait_s: float, session_timeout: float = 0):
    """(RPC session, "host:port") of a free device of ``key``; MoecError if none is free within ``wait_s``.

    ``session_timeout`` (s, 0 = none) lets the server end the session when it runs longer.
    Same protocol as ``TrackerSession.request``, plus the bounded wait and the server address.
    """
    import tvm.rpc
    from tvm.rpc import base

    tracker.close()  # a fresh tracker socket per request: a timed-out one may hold a stale reply
    wait_reachable(*tracker._addr, min(wait_s, DEFAULT_CONNECT_WAIT_S))
    tracker._connect()
    tracker._sock.settimeout(wait_s)
    try:
        base.sendjson(tracker._sock, [base.TrackerCode.REQUEST, key, "", 1])
        value = base.recvjson(tracker._sock)
    except socket.timeout:
        tracker.close()
        raise MoecError(f"no device with key '{key}' became free within {wait_s:g} s") from None
    except OSError as exc:
        tracker.close()
        raise MoecError(f"the RPC tracker at {tracker._addr[0]}:{tracker._addr[1]} dropped the request: "
                        f"{exc}") from None
    if value[0] != base.TrackerCode.SUCCESS:
        raise MoecError(f"the RPC tracker refused a request for '{key}': {value}")
    tracker._sock.settimeout(None)
    url, port, matchkey = value[1]
    return tvm.rpc.connect(url, port, matchkey, session_timeout), f"{url}:{port}"
