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
    def parse(cls, text: str) -> "TrackerAddress":
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise MoecError(f"bad tracker address '{text}'; expected HOST:PORT, e.g. 127.0.0.1:9190")
        return cls(host, int(port))

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def _base():
    from tvm.rpc import base
    return base


def _open(addr: TrackerAddress, timeout: float) -> socket.socket:
    base = _base()
    try:
        sock = socket.create_connection((addr.host, addr.port), timeout=timeout)
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise MoecError(f"cannot reach the RPC tracker at {addr}: {reason}") from None
    try:
        sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
        magic = struct.unpack("<i", base.recvall(sock, 4))[0]
    except (OSError, RuntimeError):
        sock.close()
        raise MoecError(f"{addr} does not answer as an RPC tracker") from None
    if magic != base.RPC_TRACKER_MAGIC:
        sock.close()
        raise MoecError(f"{addr} is not an RPC tracker")
    return sock


def tracker_summary(addr: TrackerAddress, timeout: float = 5.0) -> dict:
    """The tracker's summary: ``server_info`` (``key`` is ``server:KEY``) and ``queue_info``."""
    base = _base()
    sock = _open(addr, timeout)
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
    import tvm.rpc

    base = _base()
    keys = registered_keys(tracker_summary(addr, timeout=min(timeout, 10.0)))
    if key not in keys:
        listed = ", ".join(f"{k} ({n})" for k, n in sorted(keys.items())) or "none"
        raise MoecError(f"no device with key '{key}' is registered at tracker {addr} (registered: {listed})")
    sock = _open(addr, min(timeout, 10.0))
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
        return tvm.rpc.connect(host, port, matchkey, session_timeout)
    except Exception as exc:  # TVMError/RuntimeError from the FFI connect
        raise MoecError(f"device '{key}' at {host}:{port} (from tracker {addr}) refused the connection: "
                        f"{str(exc).strip().splitlines()[-1]}") from None


def _keys_text(addr: TrackerAddress) -> str:
    try:
        keys = registered_keys(tracker_summary(addr, timeout=5.0))
    except MoecError:
        return "unknown"
    return ", ".join(f"{k} ({n})" for k, n in sorted(keys.items())) or "none"


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
                       session_timeout: float = 0.0):
    """A ``BundleSession`` of ``bundle`` on a device requested from ``tracker`` (``HOST:PORT``).

    ``key`` defaults to the bundle's target preset ``rpc_key``.
    """
    from moec.artifact.bundle import read_manifest
    from moec.runtime.session import BundleSession

    addr = TrackerAddress.parse(tracker)
    if key is None:
        key = read_manifest(Path(bundle), verify=False).get("target", {}).get("rpc_key")
        if not key:
            raise MoecError(f"bundle '{bundle}' names no rpc_key; pass --key")
    log.info("requesting a '%s' device from tracker %s", key, addr)
    remote = request_device(addr, key, timeout=timeout, session_timeout=session_timeout)
    try:
        return BundleSession(bundle, remote=remote)
    except BaseException:
        remote = None  # end the RPC session now (the traceback keeps this frame), freeing the device
        gc.collect()
        raise
