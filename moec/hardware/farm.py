"""Local device farm: the stock TVM RPC tracker and N RPC servers as subprocesses on loopback.

Each process is started in its own session (process group) so that stopping a server also
ends the ``popen_worker`` and per-session children TVM forks under it. ``--detach`` writes a
state file that ``moec farm down`` reads to stop exactly those process groups.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
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
    log_dir_owned: bool = False  # moec made the log folder (removed on down)


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
        check_bind(host, insecure=True)  # the CLI refuses non-loopback without --insecure-bind; this checks the form
        self.log_dir_owned = not log_dir
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
        for proc in [*self.servers, self.tracker_proc]:
            if proc is not None:
                _stop_groups([proc.pid])  # members whose leader exited early (popen_worker)

    def remove_logs(self) -> None:
        """Remove the log folder if moec made it."""
        if self.log_dir_owned:
            shutil.rmtree(self.log_dir, ignore_errors=True)

    def state(self) -> FarmState:
        return FarmState(self.address, self.key, self.tracker_proc.pid, [p.pid for p in self.servers],
                         str(self.log_dir), log_dir_owned=self.log_dir_owned)

    def __enter__(self) -> "LocalFarm":
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Stop the farm; its own log folder is removed unless the block raised (the logs then say why)."""
        self.stop()
        if exc_type is None:
            self.remove_logs()


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


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def check_bind(host: str, insecure: bool = False) -> None:
    """Refuse a non-loopback bind address unless ``insecure`` (TVM RPC has no authentication)."""
    if not isinstance(host, str) or not host:
        raise MoecError("--host must be an address")
    if not is_loopback(host) and not insecure:
        raise MoecError(f"refusing to bind the farm to {host}: TVM RPC has no authentication, so anyone who "
                        "reaches it can run code on the servers; use a loopback address or pass --insecure-bind")


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid`` and that run TVM RPC code."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid or fields[0] in ("Z", "X"):
                continue
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        if any(t in cmd for t in ("rpc_tracker", "rpc_server", "rpc_device", "popen_worker", "tvm")):
            out.append(int(d.name))
    return out


def _stop_groups(pgids: list[int], grace: float = 10.0) -> list[int]:
    """SIGTERM then SIGKILL every group in ``pgids`` that still has RPC members, leader alive or not;
    returns the pids still alive afterwards."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for g in pgids:
            if _group_members(g):
                kill_group(g, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_group_members(g) for g in pgids):
            time.sleep(0.1)
    return [pid for g in pgids for pid in _group_members(g)]


def farm_down(path: str | os.PathLike = DEFAULT_STATE) -> FarmState:
    """Stop the detached farm recorded in ``path``: every process group it started, even one whose
    leader is already dead (its forked ``popen_worker`` still serves); remove its logs and the file."""
    p = Path(path)
    if not p.is_file():
        raise MoecError(f"no detached farm: state file '{p}' does not exist")
    try:
        raw = read_json(p, "farm state file")
        state = FarmState(**raw)
        pgids = [int(x) for x in [*state.server_pids, state.tracker_pid]]
    except (TypeError, ValueError) as exc:
        raise MoecError(f"farm state file '{p}' is malformed: {exc}") from None
    if any(g <= 1 for g in pgids):
        raise MoecError(f"farm state file '{p}' is malformed: bad process id")
    left = _stop_groups(pgids)
    if left:
        raise MoecError(f"farm processes {left} did not stop")
    if state.log_dir_owned:
        shutil.rmtree(state.log_dir, ignore_errors=True)
    p.unlink(missing_ok=True)
    return state
