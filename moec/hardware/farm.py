"""Local device farm: the stock TVM RPC tracker and N RPC servers as subprocesses on loopback.

Each process is started in its own session (process group) so that stopping a server also
ends the ``popen_worker`` and per-session children TVM forks under it. ``--detach`` writes a
state file that ``moec farm down`` reads to stop exactly those process groups.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from moec.core.errors import MoecError
from moec.core.io import atomic_write_json, read_json
from moec.hardware.loopback import kill_group, spawn_group
from moec.hardware.tracker_client import wait_for_devices
from moec.runtime.remote import free_port

__all__ = ["DEFAULT_STATE", "FarmState", "LocalFarm", "farm_down", "free_port", "write_state"]

log = logging.getLogger("moec.farm")

DEFAULT_STATE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moec" / "farm.json"


@dataclass
class FarmState:
    tracker: str
    key: str
    tracker_pid: int
    server_pids: list[int]
    log_dir: str
    started_at: float = field(default_factory=time.time)


class LocalFarm:
    """A tracker and ``servers`` RPC servers with ``key`` on ``host``.

    ``sampler``: servers are :mod:`moec.hardware.rpc_device` (stock server + on-device energy
    sampler); otherwise plain ``python -m tvm.exec.rpc_server``. ``threads`` sets the servers'
    ``TVM_NUM_THREADS`` (default: TVM's, one per core); one farm of several servers on one host
    shares its cores, so timings there are for tests, not for figures.
    """

    def __init__(self, servers: int = 2, key: str = "host", port: int | None = None, host: str = "127.0.0.1",
                 sampler: bool = True, log_dir: str | os.PathLike | None = None, threads: int | None = None) -> None:
        if servers < 1:
            raise MoecError("a farm needs at least one server (--servers >= 1)")
        if not key or ":" in key or " " in key:
            raise MoecError(f"bad device key '{key}'; use letters, digits, '-' or '_'")
        self.n, self.key, self.host, self.sampler = servers, key, host, sampler
        self.port, self.threads = port, threads
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="moec-farm-"))
        self.tracker_proc: subprocess.Popen | None = None
        self.servers: list[subprocess.Popen] = []
        self.server_ports: list[int] = []

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen:
        env = dict(os.environ)
        if self.threads:
            env["TVM_NUM_THREADS"] = str(self.threads)
        root = str(Path(__file__).resolve().parents[2])  # the moec this process runs, for the servers too
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return spawn_group([sys.executable, *args], self.log_dir / log_name, env)

    def start_server(self) -> subprocess.Popen:
        """Start one more RPC server with this farm's key."""
        port = free_port(self.host)
        module = "moec.hardware.rpc_device" if self.sampler else "tvm.exec.rpc_server"
        args = ["-m", module, "--host", self.host, "--port", str(port), "--port-end", str(port + 1),
                "--tracker", self.address, "--key", self.key]
        proc = self._spawn(args, f"server-{len(self.servers)}.log")
        self.servers.append(proc)
        self.server_ports.append(port)
        return proc

    def start(self, wait_s: float = 60.0) -> str:
        """Start the tracker and the servers; returns the tracker address once all registered."""
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            if self.port is None:
                self.port = free_port(self.host)
            self.tracker_proc = self._spawn(["-m", "tvm.exec.rpc_tracker", "--host", self.host, "--port",
                                             str(self.port), "--port-end", str(self.port + 1), "--silent"],
                                            "tracker.log")
            # servers start at once (their imports overlap the tracker's); one that finds no tracker
            # yet retries every 5 s
            for _ in range(self.n):
                self.start_server()
            wait_for_devices(self.address, self.key, self.n, wait_s)
            if self.tracker_proc.poll() is not None:
                raise MoecError(f"the RPC tracker exited (port {self.port} taken?); see {self.log_dir}/tracker.log")
        except BaseException:
            self.stop()
            raise
        log.info("farm up: tracker %s, %d server(s) with key %s", self.address, self.n, self.key)
        return self.address

    def kill_server(self, index: int, sig: int = signal.SIGKILL) -> None:
        """Kill server ``index`` and everything it forked (its process group)."""
        kill_group(self.servers[index].pid, sig)
        self.servers[index].wait(timeout=10)

    def stop(self) -> None:
        """Stop every process this farm started (servers first, then the tracker)."""
        for proc in [*self.servers, self.tracker_proc]:
            if proc is not None and proc.poll() is None:
                kill_group(proc.pid, signal.SIGTERM)
        for proc in [*self.servers, self.tracker_proc]:
            if proc is None:
                continue
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                kill_group(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
            kill_group(proc.pid, signal.SIGKILL)  # children left in the group

    def state(self) -> FarmState:
        return FarmState(self.address, self.key, self.tracker_proc.pid, [p.pid for p in self.servers],
                         str(self.log_dir))

    def __enter__(self) -> "LocalFarm":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _is_ours(pid: int) -> bool:
    """Whether ``pid`` is still a tracker/server process (not a reused pid)."""
    try:
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return False  # exited (a zombie until its parent reaps it)
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, IndexError):
        return False
    return "rpc_tracker" in cmd or "rpc_server" in cmd or "rpc_device" in cmd


def write_state(farm: LocalFarm, path: str | os.PathLike = DEFAULT_STATE) -> Path:
    p = Path(path)
    if p.is_file():
        old = FarmState(**read_json(p, "farm state file"))
        if any(_is_ours(pid) for pid in [old.tracker_pid, *old.server_pids]):
            raise MoecError(f"a detached farm is already running (tracker {old.tracker}); "
                            f"stop it with 'moec farm down' first")
    atomic_write_json(p, asdict(farm.state()))
    return p


def farm_down(path: str | os.PathLike = DEFAULT_STATE) -> FarmState:
    """Stop the detached farm recorded in ``path`` and remove the file."""
    p = Path(path)
    if not p.is_file():
        raise MoecError(f"no detached farm: state file '{p}' does not exist")
    try:
        state = FarmState(**json.loads(p.read_text()))
    except (TypeError, ValueError) as exc:
        raise MoecError(f"farm state file '{p}' is malformed: {exc}") from None
    pids = [*state.server_pids, state.tracker_pid]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            if _is_ours(pid):
                kill_group(pid, sig)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_is_ours(pid) for pid in pids):
            time.sleep(0.1)
    if any(_is_ours(pid) for pid in pids):
        raise MoecError(f"farm processes {[pid for pid in pids if _is_ours(pid)]} did not stop")
    p.unlink(missing_ok=True)
    return state
