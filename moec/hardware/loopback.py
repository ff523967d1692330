"""Stock TVM tracker and RPC server processes on loopback, each in its own process group.

A tracker or server started here is stopped with its whole process group: TVM's RPC server
starts ``tvm.exec.popen_worker`` children that outlive a kill of the server's PID alone.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from moec.core.errors import MoecError
from moec.runtime.remote import TrackerAddress, free_port, registered_keys, tracker_summary

__all__ = ["ManagedProcess", "free_port", "kill_group", "spawn_group", "start_rpc_server", "start_tracker",
           "stop_group"]

log = logging.getLogger("moec")


@dataclass
class ManagedProcess:
    """A child process group with its log file; ``stop()`` ends the whole group."""

    name: str
    proc: subprocess.Popen
    log_path: Path
    info: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def stop(self, grace: float = 5.0) -> None:
        if not stop_group(self.proc, grace):
            log.warning("%s (pid %d) did not exit", self.name, self.proc.pid)

    def __enter__(self) -> "ManagedProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def kill_group(pid: int, sig: int) -> None:
    """Send ``sig`` to the process group led by ``pid`` (gone already: nothing to do)."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_group(proc: subprocess.Popen, grace: float = 5.0) -> bool:
    """SIGTERM ``proc``'s process group, then SIGKILL what is left of it; whether ``proc`` exited."""
    kill_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        pass
    kill_group(proc.pid, signal.SIGKILL)  # the group may outlive its leader (popen workers)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        return False
    return True


def spawn_group(cmd: list[str], log_path: Path, env: dict | None = None) -> subprocess.Popen:
    """``cmd`` in its own session (process group), stdout and stderr appended to ``log_path``."""
    with open(log_path, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env)


def _spawn(name: str, cmd: list[str], log_dir: Path | None, env: dict | None = None) -> ManagedProcess:
    folder = Path(log_dir) if log_dir else Path(tempfile.gettempdir())
    folder.mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(dir=folder, prefix=f"moec-{name}-", suffix=".log")
    os.close(fd)
    proc = spawn_group(cmd, Path(path), env)
    log.info("started %s (pid %d): %s", name, proc.pid, " ".join(cmd))
    return ManagedProcess(name, proc, Path(path))


def start_tracker(host: str = "127.0.0.1", port: int | None = None, timeout: float = 30.0,
                  log_dir: Path | None = None) -> tuple[ManagedProcess, TrackerAddress]:
    """``python -m tvm.exec.rpc_tracker`` bound to exactly ``host:port`` (a free port if None)."""
    attempts = 1 if port is not None else 3
    last = ""
    for _ in range(attempts):
        p = port if port is not None else free_port(host)
        proc = _spawn("tracker", [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", host, "--port", str(p),
                                  "--port-end", str(p + 1)], log_dir)
        addr = TrackerAddress(host, p)
        deadline = time.time() + timeout
        try:
            while time.time() < deadline and proc.alive():
                try:  # its own log says it bound the port: a tracker answering there could be another one
                    if f"bind to {host}:{p}" not in proc.log_path.read_text(errors="replace"):
                        raise MoecError("not bound yet")
                    tracker_summary(addr, timeout=2.0)
                    proc.info["address"] = str(addr)
                    return proc, addr
                except MoecError:
                    time.sleep(0.2)
            text = proc.log_path.read_text(errors="replace")
            last = f"port {p} is in use" if "cannot bind" in text else (proc.log_tail() or "no output")
        finally:
            if "address" not in proc.info:  # not started (or interrupted): never leave it behind
                proc.stop()
    raise MoecError(f"the RPC tracker did not start on {host}:{port or 'a free port'}: {last}")


def start_rpc_server(tracker: TrackerAddress, key: str, python: str | os.PathLike = sys.executable,
                     timeout: float = 180.0, log_dir: Path | None = None, env: dict | None = None,
                     host: str = "127.0.0.1", extra_args: list[str] | None = None) -> ManagedProcess:
    """``PYTHON -m tvm.exec.rpc_server --tracker ... --key KEY``; returns once the tracker lists it.

    ``python`` may be the emulated device's wrapper (``EmulatedDevice.python``).
    """
    before = registered_keys(tracker_summary(tracker)).get(key, 0)
    t0 = time.time()
    proc = _spawn(f"rpc-server-{key}", [str(python), "-m", "tvm.exec.rpc_server", "--tracker", str(tracker),
                                         "--key", key, "--host", host, *(extra_args or [])], log_dir, env)
    try:
        while time.time() - t0 < timeout:
            if not proc.alive():
                raise MoecError(f"the RPC server for '{key}' exited (code {proc.proc.returncode}): "
                                f"{proc.log_tail() or 'no output'}")
            try:
                if registered_keys(tracker_summary(tracker)).get(key, 0) > before:
                    proc.info["registration_seconds"] = time.time() - t0
                    return proc
            except MoecError:
                pass
            time.sleep(0.5)
        tail = proc.log_tail()
        raise MoecError(f"the RPC server for '{key}' did not register with tracker {tracker} within {timeout:.0f} s"
                        + (f": {tail}" if tail else ""))
    except BaseException:  # also Ctrl-C while waiting: never leave the server behind
        proc.stop()
        raise
