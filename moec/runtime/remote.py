"""Reach a device through a stock TVM RPC tracker, with timeouts, and check a library fits a machine.

``tvm.rpc.connect_tracker`` retries for a minute on a refused port and ``TrackerSession.request``
waits forever for a free device. Here both are bounded: the tracker protocol (``tvm.rpc.base``:
magic, JSON messages, ``TrackerCode``) is spoken over a socket with a timeout, and only the final
connection to the granted server goes through ``tvm.rpc.connect``.
"""

from __future__ import annotations

import gc
import logging
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from moec.errors import MoecError

log = logging.getLogger("moec")

# ELF e_machine values → the machine name `uname -m` reports.
_ELF_MACHINES = {0x3E: "x86_64", 0xB7: "aarch64", 0x28: "arm", 0x03: "i386", 0xF3: "riscv64"}


@dataclass(frozen=True)
class TrackerAddress:
    host: str
    port: int

    @classmethod
    def parse(cls, text: "str | TrackerAddress") -> "TrackerAddress":
        """``HOST:PORT`` (or a :class:`TrackerAddress`), with a one-line error for anything else."""
        if isinstance(text, TrackerAddress):
            return text
        host, sep, port = str(text).rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise MoecError(f"bad tracker address '{text}'; expected HOST:PORT, e.g. 127.0.0.1:9190")
        return cls(host, int(port))

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _base():
    from tvm.rpc import base
    return base


def open_tracker(addr: TrackerAddress, timeout: float, wait_s: float = 0.0, hint: str = "") -> socket.socket:
    """A socket to the tracker at ``addr`` after the tracker handshake (every step bounded).

    ``wait_s`` > 0 retries a refused or unreachable port for that long (a tracker that is still
    starting); 0 fails at once. ``hint`` is appended to the "cannot reach" error.
    """
    base = _base()
    deadline = time.monotonic() + wait_s
    while True:
        try:
            sock = socket.create_connection((addr.host, addr.port),
                                            timeout=min(2.0, max(wait_s, 0.1)) if wait_s > 0 else timeout)
            break
        except OSError as exc:
            if time.monotonic() < deadline:
                time.sleep(0.2)
                continue
            reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
            where = f"at {addr} after {wait_s:g} s ({reason})" if wait_s > 0 else f"at {addr}: {reason}"
            raise MoecError(f"cannot reach the RPC tracker {where}{hint}") from None
    try:
        sock.settimeout(timeout)
        sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
        magic = struct.unpack("<i", base.recvall(sock, 4))[0]
    except (OSError, RuntimeError, struct.error):
        sock.close()
        raise MoecError(f"{addr} does not answer as an RPC tracker") from None
    if magic != base.RPC_TRACKER_MAGIC:
        sock.close()
        raise MoecError(f"{addr} is not an RPC tracker")
    return sock


def tracker_summary(addr: TrackerAddress, timeout: float = 5.0, wait_s: float = 0.0, hint: str = "") -> dict:
    """The tracker's summary: ``server_info`` (``key`` is ``server:KEY``) and ``queue_info``.

    ``wait_s`` and ``hint``: as for :func:`open_tracker`.
    """
    base = _base()
    sock = open_tracker(addr, timeout, wait_s, hint)
    try:
        base.sendjson(sock, [base.TrackerCode.SUMMARY])
        value = base.recvjson(sock)
    except (OSError, RuntimeError) as exc:
        raise MoecError(f"the RPC tracker at {addr} did not answer a summary request: {exc}") from None
    finally:
        sock.close()
    if value[0] != base.TrackerCode.SUCCESS:
        raise MoecError(f"the RPC tracker at {addr} refused a summary request: {value}")
    return value[1]


def registered_keys(summary: dict) -> dict[str, int]:
    """Device key → number of servers registered under it."""
    out: dict[str, int] = {}
    for item in summary.get("server_info", []):
        key = item.get("key", "").split(":", 1)[-1]
        out[key] = out.get(key, 0) + 1
    return out


def request_device(addr: TrackerAddress, key: str, timeout: float = 60.0, session_timeout: float = 0.0,
                   priority: int = 1):
    """An RPC session on a device registered under ``key``.

    A key no server has registered fails at once (typo, device down); a registered but busy key
    waits up to ``timeout`` s for a free server.
    """
    return request_device_at(addr, key, timeout, session_timeout, priority)[0]


def request_device_at(addr: TrackerAddress, key: str, timeout: float = 60.0, session_timeout: float = 0.0,
                      priority: int = 1, check_registered: bool = True, connect_wait_s: float = 0.0):
    """(RPC session, ``"host:port"`` of the granted server) of a free device of ``key``.

    Same protocol as ``TrackerSession.request``, with a fresh tracker socket per request and a
    bounded wait: ``timeout`` s for a free server. ``check_registered`` fails at once for a key
    no server has registered; ``connect_wait_s`` retries an unreachable tracker that long.
    ``session_timeout`` (s, 0 = none) lets the server end a session that runs longer.
    """
    import tvm.rpc

    base = _base()
    if check_registered:
        keys = registered_keys(tracker_summary(addr, min(timeout, 10.0), connect_wait_s))
        if key not in keys:
            raise MoecError(f"no device with key '{key}' is registered at tracker {addr} "
                            f"(registered: {_keys_listed(keys)})")
    sock = open_tracker(addr, min(timeout, 10.0), connect_wait_s)
    try:
        sock.settimeout(timeout)
        base.sendjson(sock, [base.TrackerCode.REQUEST, key, "", priority])
        value = base.recvjson(sock)
    except (TimeoutError, socket.timeout):
        sock.close()  # the tracker drops a closed client's request when it next schedules it
        raise MoecError(f"no device with key '{key}' became free at tracker {addr} within {timeout:.0f} s "
                        f"(registered: {_keys_text(addr)})") from None
    except (OSError, RuntimeError) as exc:
        sock.close()
        raise MoecError(f"the RPC tracker at {addr} dropped the request for '{key}': {exc}") from None
    sock.close()
    if value[0] != base.TrackerCode.SUCCESS:
        raise MoecError(f"the RPC tracker at {addr} refused the request for '{key}': {value}")
    host, port, matchkey = value[1]
    try:
        return tvm.rpc.connect(host, port, matchkey, session_timeout), f"{host}:{port}"
    except Exception as exc:  # TVMError/RuntimeError from the FFI connect
        raise MoecError(f"device '{key}' at {host}:{port} (from tracker {addr}) refused the connection: "
                        f"{str(exc).strip().splitlines()[-1]}") from None


def _keys_listed(keys: dict[str, int]) -> str:
    return ", ".join(f"{k} ({n})" for k, n in sorted(keys.items())) or "none"


def _keys_text(addr: TrackerAddress) -> str:
    try:
        return _keys_listed(registered_keys(tracker_summary(addr, timeout=5.0)))
    except MoecError:
        return "unknown"


def elf_machine(path: str | Path) -> str | None:
    """Machine of an ELF shared library (``x86_64``, ``aarch64``, ...), None if not ELF/unknown."""
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError:
        return None
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    order = "<" if head[5] == 1 else ">"
    return _ELF_MACHINES.get(struct.unpack(order + "H", head[18:20])[0], f"elf-machine-{head[18]:#x}")


def open_remote_bundle(bundle: str | Path, tracker: str, key: str | None = None, timeout: float = 60.0,
                       session_timeout: float = 0.0, trust: str | Path | None = None):
    """A ``BundleSession`` of ``bundle`` on a device requested from ``tracker`` (``HOST:PORT``).

    ``key`` defaults to the bundle's target preset ``rpc_key``.
    """
    from moec.artifact.bundle import verify_bundle
    from moec.runtime.session import BundleSession

    addr = TrackerAddress.parse(tracker)
    manifest = verify_bundle(Path(bundle), trust)  # before asking for a device
    if key is None:
        key = manifest["target"].get("rpc_key")
        if not key:
            raise MoecError(f"bundle '{bundle}' names no rpc_key; pass --key")
    log.info("requesting a '%s' device from tracker %s", key, addr)
    remote = request_device(addr, key, timeout=timeout, session_timeout=session_timeout)
    try:
        return BundleSession(bundle, remote=remote, trust=trust)
    except BaseException:
        remote = None  # end the RPC session now (the traceback keeps this frame), freeing the device
        gc.collect()
        raise
