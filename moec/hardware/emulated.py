"""An emulated 64-bit ARM device: an aarch64 Debian userland + TVM runtime run under qemu-user.

``setup_device()`` builds it (idempotently) in a cache folder (``$MOEC_EMU_DIR``, default
``~/.cache/moec/arm64-emu``):

- ``rootfs/``: ``debootstrap --foreign --arch=arm64 --variant=minbase --include=python3`` (download
  only, no emulated dpkg), every downloaded .deb unpacked with ``dpkg-deb -x``, docs and locales trimmed;
- ``site/``: the aarch64 ``apache-tvm`` wheel and its dependencies, ``pip install --target`` from the
  host, with the compiler library and CUDA runtime removed (the device only needs the runtime);
- ``bin/python3``: a host script that runs the aarch64 ``python3.11`` under ``qemu-aarch64-static``.
  ``boot/sitecustomize.py`` points ``sys.executable`` at that script, so the RPC server's worker
  processes (started with ``sys.executable``) run under qemu too, without binfmt_misc;
- ``ready.json``: written last, after the device imported TVM and reported ``aarch64``.

Timings under emulation say nothing about real ARM speed: use the device for correctness and for
the device-farm path.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moec.core.errors import MoecError
from moec.core.io import atomic_write_json, atomic_write_text
from moec.hardware.loopback import ManagedProcess, start_rpc_server, start_tracker
from moec.runtime.remote import TrackerAddress, tracker_summary

log = logging.getLogger("moec")

TVM_WHEEL = "apache-tvm==0.27.0.post1"
DEVICE_PACKAGES = [TVM_WHEEL, "cloudpickle", "psutil"]
SUITE = "bookworm"  # its python3 is 3.11, one of the versions the aarch64 TVM wheel supports
DEVICE_PYTHON = "python3.11"
LAYOUT_VERSION = 2
# Debian packages the host needs: the emulator, debootstrap, and the cross compiler for aarch64 bundles.
HOST_TOOLS = {"qemu-aarch64-static": "qemu-user-static", "debootstrap": "debootstrap",
              "dpkg-deb": "dpkg", "aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu"}
_SBIN = "/usr/sbin:/sbin"
# Inside site/: what the device never needs (the compiler library is most of the wheel's size).
_SITE_TRIM = ["tvm/lib/libtvm_compiler.so", "tvm/lib/libtvm_runtime_cuda.so", "tvm/3rdparty", "tvm/include",
              "tvm/src", "tvm/web", "tvm/cmake", "bin"]
_ROOTFS_TRIM = ["usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "usr/share/lintian",
                "var/cache/apt/archives", "debootstrap"]

StepCallback = Callable[[str, float], None]


def default_dir() -> Path:
    env = os.environ.get("MOEC_EMU_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "moec" / "arm64-emu"


@dataclass(frozen=True)
class EmulatedDevice:
    """Paths of a set-up device folder."""

    root: Path

    @property
    def rootfs(self) -> Path:
        return self.root / "rootfs"

    @property
    def site(self) -> Path:
        return self.root / "site"

    @property
    def python(self) -> Path:
        """Host wrapper that runs the device's Python under qemu (use it as an executable)."""
        return self.root / "bin" / "python3"

    @property
    def stamp(self) -> Path:
        return self.root / "ready.json"

    def is_ready(self) -> bool:
        if not self.stamp.is_file():
            return False
        try:
            info = json.loads(self.stamp.read_text())
        except (OSError, json.JSONDecodeError):
            return False
        return (info.get("layout") == LAYOUT_VERSION and info.get("tvm") == TVM_WHEEL
                and self.python.is_file() and (self.rootfs / "usr/bin" / DEVICE_PYTHON).exists())

    @property
    def extra_runtime(self) -> Path:
        """TVM's extra runtime (sort/top-k, random, ...); runtime-only mode does not load it by itself."""
        return self.site / "tvm" / "lib" / "libtvm_runtime_extra.so"

    def server_args(self) -> list[str]:
        """Extra ``tvm.exec.rpc_server`` arguments this device needs."""
        return ["--load-library", str(self.extra_runtime)]

    def info(self) -> dict:
        return json.loads(self.stamp.read_text())

    def run_python(self, args: list[str], timeout: float) -> subprocess.CompletedProcess:
        """Run the device's Python with ``args`` (captured output; MoecError on timeout)."""
        try:
            return subprocess.run([str(self.python), *args], capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise MoecError(f"the emulated device's python did not finish within {timeout:.0f} s") from None


def _which(tool: str) -> str | None:
    return shutil.which(tool, path=os.environ.get("PATH", "") + os.pathsep + _SBIN)


def missing_host_tools() -> list[str]:
    return [t for t in HOST_TOOLS if _which(t) is None]


def ensure_host_tools(install: bool = True) -> None:
    """Install the missing Debian packages (as root, with apt-get), or say which to install."""
    missing = missing_host_tools()
    if not missing:
        return
    pkgs = sorted({HOST_TOOLS[t] for t in missing})
    cmd = "apt-get install -y --no-install-recommends " + " ".join(pkgs)
    if not install or os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise MoecError(f"missing {', '.join(missing)}; install them with: sudo {cmd}")
    apt = ["apt-get", "-o", "DPkg::Lock::Timeout=300", "install", "-y", "--no-install-recommends", *pkgs]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log.info("installing %s", " ".join(pkgs))
    if subprocess.run(apt, capture_output=True, text=True, env=env).returncode != 0:
        subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=300", "update"], capture_output=True, env=env)
        res = subprocess.run(apt, capture_output=True, text=True, env=env)
        if res.returncode != 0:
            tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["?"]
            raise MoecError(f"'{cmd}' failed: {tail[0]}")
    still = missing_host_tools()
    if still:
        raise MoecError(f"still missing after apt-get: {', '.join(still)}")


def _run(cmd: list[str], what: str, timeout: float, cwd: Path | None = None, quiet: bool = False) -> None:
    log.log(logging.DEBUG if quiet else logging.INFO, "%s: %s", what, " ".join(cmd))
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                             env={**os.environ, "PATH": os.environ.get("PATH", "") + os.pathsep + _SBIN})
    except subprocess.TimeoutExpired:
        raise MoecError(f"{what} did not finish within {timeout:.0f} s") from None
    if res.returncode != 0:
        lines = [ln for ln in (res.stderr + "\n" + res.stdout).strip().splitlines() if ln.strip()]
        raise MoecError(f"{what} failed (exit {res.returncode}): {lines[-1] if lines else 'no output'}")


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _build_rootfs(dest: Path, mirror: str) -> None:
    part = dest.with_name(dest.name + ".partial")
    _remove(part)
    _run(["debootstrap", "--foreign", "--arch=arm64", "--variant=minbase", "--include=python3", SUITE,
          str(part), mirror], "debootstrap (arm64, download only)", timeout=900)
    debs = sorted((part / "var/cache/apt/archives").glob("*.deb"))
    if not debs:
        raise MoecError(f"debootstrap downloaded no packages into {part}")
    for deb in debs:
        _run(["dpkg-deb", "-x", str(deb), str(part)], f"unpacking {deb.name}", timeout=300, quiet=True)
    for rel in _ROOTFS_TRIM:
        _remove(part / rel)
    if not (part / "usr/bin" / DEVICE_PYTHON).exists():
        raise MoecError(f"the arm64 userland has no /usr/bin/{DEVICE_PYTHON} after unpacking")
    _remove(dest)
    part.rename(dest)


def _install_site(dest: Path) -> None:
    part = dest.with_name(dest.name + ".partial")
    _remove(part)
    _run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--target", str(part),
          "--only-binary=:all:", "--platform", "manylinux_2_28_aarch64", "--python-version", "3.11",
          "--implementation", "cp", "--abi", "cp311", "--abi", "abi3", "--abi", "none", *DEVICE_PACKAGES],
         "pip install (aarch64 wheels)", timeout=1200)
    for rel in _SITE_TRIM:
        _remove(part / rel)
    _remove(dest)
    part.rename(dest)


def _write_launcher(dev: EmulatedDevice) -> None:
    qemu = _which("qemu-aarch64-static")
    boot = dev.root / "boot"
    boot.mkdir(parents=True, exist_ok=True)
    atomic_write_text(boot / "sitecustomize.py",
                      '"""moec emulated device: child processes start through the qemu wrapper."""\n'
                      "import os\nimport sys\n\n"
                      "if os.environ.get('MOEC_EMU_EXECUTABLE'):\n"
                      "    sys.executable = os.environ['MOEC_EMU_EXECUTABLE']\n")
    script = ("#!/bin/sh\n"
              "# moec emulated arm64 device: the aarch64 Python of rootfs/ under qemu-user (no binfmt needed).\n"
              f"export PYTHONPATH='{boot}:{dev.site}'\n"
              "export TVM_USE_RUNTIME_LIB=1\n"
              "unset PYTHONDONTWRITEBYTECODE  # cached bytecode halves start-up under emulation\n"
              f"export MOEC_EMU_EXECUTABLE='{dev.python}'\n"
              f"exec '{qemu}' -L '{dev.rootfs}' '{dev.rootfs}/usr/bin/{DEVICE_PYTHON}' \"$@\"\n")
    dev.python.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(dev.python, script)
    dev.python.chmod(0o755)


def _compile_bytecode(dev: EmulatedDevice) -> None:
    """Write .pyc files for the device's stdlib and site (dpkg's py3compile never ran there).

    Importing TVM from source under emulation takes about twice as long. Bytecode depends only on
    the Python minor version, so a host 3.11 compiles it fast; otherwise the device does it.
    """
    dirs = [str(dev.rootfs / "usr/lib" / DEVICE_PYTHON), str(dev.site), str(dev.root / "boot")]
    host_ok = f"python{sys.version_info[0]}.{sys.version_info[1]}" == DEVICE_PYTHON
    cmd = [sys.executable if host_ok else str(dev.python), "-m", "compileall", "-q", *(["-j0"] if host_ok else []),
           *dirs]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    try:  # a few test modules written for other Python versions fail to compile: not an error here
        subprocess.run(cmd, capture_output=True, timeout=1800, env=env)
    except subprocess.TimeoutExpired:
        log.warning("compiling the device's bytecode timed out; it will be compiled on first use")


def _du_mb(path: Path) -> float:
    total = sum(p.lstat().st_size for p in path.rglob("*") if not p.is_symlink() and p.is_file())
    return total / 2**20


def setup_device(root: str | os.PathLike | None = None, force: bool = False, install_tools: bool = True,
                 on_step: StepCallback | None = None) -> EmulatedDevice:
    """Set up (or reuse) the emulated arm64 device in ``root``; returns its paths.

    Steps already done are skipped (each lands by an atomic rename); ``force`` redoes them all.
    """
    if sys.platform != "linux":
        raise MoecError("the emulated arm64 device needs Linux (qemu-user)")
    dev = EmulatedDevice(Path(root).expanduser().resolve() if root else default_dir())
    try:
        dev.root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MoecError(f"cannot create the device folder '{dev.root}': {exc.strerror}") from None

    def step(name: str, t0: float) -> None:
        if on_step is not None:
            on_step(name, time.time() - t0)

    try:
        lock = open(dev.root / ".lock", "w")
    except OSError as exc:
        raise MoecError(f"the device folder '{dev.root}' is not writable: {exc.strerror}") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second set-up of the same folder waits for the first
        if force:
            for p in (dev.stamp, dev.rootfs, dev.site):
                _remove(p)
        if dev.is_ready():
            return dev
        t_all = time.time()
        t0 = time.time()
        ensure_host_tools(install_tools)
        step("host tools", t0)
        if not (dev.rootfs / "usr/bin" / DEVICE_PYTHON).exists():
            t0 = time.time()
            _build_rootfs(dev.rootfs, os.environ.get("MOEC_EMU_MIRROR", "http://deb.debian.org/debian"))
            step("arm64 userland", t0)
        if not (dev.site / "tvm").is_dir():
            t0 = time.time()
            _install_site(dev.site)
            step("aarch64 TVM runtime", t0)
        _write_launcher(dev)
        t0 = time.time()
        _compile_bytecode(dev)
        step("bytecode", t0)
        t0 = time.time()
        res = dev.run_python(["-c", "import platform, tvm; print(platform.machine(), tvm.__version__)"], 600)
        words = res.stdout.split()
        if res.returncode != 0 or not words or words[0] != "aarch64":
            err = (res.stderr.strip().splitlines() or ["no output"])[-1]
            raise MoecError(f"the emulated device does not start: {err}")
        step("device check (import tvm)", t0)
        atomic_write_json(dev.stamp, {"layout": LAYOUT_VERSION, "tvm": TVM_WHEEL, "suite": SUITE,
                                      "machine": words[0], "device_tvm": words[1] if len(words) > 1 else "?",
                                      "setup_seconds": round(time.time() - t_all, 1),
                                      "size_mb": round(_du_mb(dev.root), 1),
                                      "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return dev


@dataclass
class RunningDevice:
    """A started emulated device: its RPC server, and the tracker if this call started one."""

    device: EmulatedDevice
    tracker_address: TrackerAddress
    key: str
    server: ManagedProcess
    tracker: ManagedProcess | None = None

    def stop(self) -> None:
        self.server.stop()
        if self.tracker is not None:
            self.tracker.stop()

    def __enter__(self) -> "RunningDevice":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_device(tracker: str | None = None, key: str = "arm64-emu", root: str | os.PathLike | None = None,
                 timeout: float = 300.0, log_dir: str | os.PathLike | None = None,
                 on_step: StepCallback | None = None) -> RunningDevice:
    """Set up the device if needed, then start its RPC server registered under ``key``.

    ``tracker`` is ``HOST:PORT`` of a running tracker; None starts a stock tracker on a free
    loopback port (stopped with the device). Returns once the tracker lists the server.
    """
    if tracker is not None:
        addr = TrackerAddress.parse(tracker)
        tracker_summary(addr)  # unreachable → one-line error before the slow set-up and server start
    dev = setup_device(root, on_step=on_step)
    logs = Path(log_dir) if log_dir else dev.root / "logs"
    tracker_proc = None
    if tracker is None:
        t0 = time.time()
        # the tracker imports tvm before it binds: well over 30 s on a loaded machine
        tracker_proc, addr = start_tracker(timeout=min(timeout, 120.0), log_dir=logs)
        if on_step is not None:
            on_step(f"tracker on {addr}", time.time() - t0)
    try:
        t0 = time.time()
        server = start_rpc_server(addr, key, python=dev.python, timeout=timeout, log_dir=logs,
                                  extra_args=dev.server_args())
        if on_step is not None:
            on_step(f"device '{key}' registered", time.time() - t0)
    except BaseException:
        if tracker_proc is not None:
            tracker_proc.stop()
        raise
    return RunningDevice(dev, addr, key, server, tracker_proc)
