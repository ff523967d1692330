"""Things the profiler measures: a built bundle (decode steps) or one GEMV kernel class, run over RPC.

A candidate knows its fingerprint (what the measurement store is keyed by), how to prepare
what it uploads, and how to time itself on an RPC session. Times come from TVM's
``time_evaluator`` on the device; ``Protocol`` fixes how many calls and repeats are timed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from moec.artifact.bundle import read_manifest
from moec.core.config import MoEConfig
from moec.core.errors import MoecError
from moec.core.plan import BitPlan
from moec.core.targets import load_target
from moec.hardware.energy_model import decode_energy_j
from moec.lower.kernels.factory import compile_kernel, make_gemv
from moec.lower.kernels.layout import num_tiles, zero_words
from moec.lower.schedules import kernel_tile


@dataclass(frozen=True)
class Protocol:
    """How a candidate is timed: ``number`` calls per timing, ``repeat`` timings (the samples)."""

    number: int = 5
    repeat: int = 7
    steps: int = 8            # decode steps of a bundle's token stream (the KV cache grows across them)
    flush_bytes: int = 0      # kernels: flush this much cache before each (single-call) timing; 0 = hot loop
    round: int = 0            # repeated measurement rounds of the same candidates are stored apart

    def key(self) -> dict:
        return asdict(self)


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


@dataclass
class Timing:
    """Raw result of one run on a device: per-repeat seconds and the device's energy reading."""

    samples: list[float]
    energy: dict | None = None   # {"joules", "seconds", "samples", "meters"} from the device sampler
    best: float | None = None    # least-disturbed estimate: mean over steps of each step's fastest repeat

    def __post_init__(self) -> None:
        if self.best is None and self.samples:
            self.best = float(min(self.samples))


class BundleCandidate:
    """A bundle directory, timed as decode steps over a fixed token stream (KV cache carried on device)."""

    kind = "bundle"

    def __init__(self, path: str | os.PathLike, tokens: list[int] | None = None, label: str | None = None) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path, verify=True)
        self.cfg = self.manifest["model"]["config"]
        self.tokens = tokens
        self.label = label or self.path.name
        self.target = self.manifest["target"]["name"]

    def token_stream(self, protocol: Protocol) -> list[int]:
        if self.tokens is not None:
            if len(self.tokens) < protocol.steps:
                raise MoecError(f"{self.label}: {len(self.tokens)} tokens given, the protocol times "
                                f"{protocol.steps} steps")
            return list(self.tokens[:protocol.steps])
        rng = np.random.default_rng(0)
        return rng.integers(0, self.cfg["vocab_size"], protocol.steps).tolist()

    def fingerprint(self, protocol: Protocol) -> str:
        files = {name: meta["sha256"] for name, meta in sorted(self.manifest["files"].items())
                 if name in ("lib.so", "weights.bin")}
        return _sha({"kind": self.kind, "files": files, "plan": self.manifest["plan"],
                     "model": self.manifest["model"]["fingerprint"], "protocol": protocol.key(),
                     "tokens": self.token_stream(protocol)})

    def prepare(self, workdir: Path) -> None:
        pass

    def run(self, remote, protocol: Protocol, energy_spec: dict | None) -> Timing:
        import tvm

        from moec.artifact.bundle import verified_copy, verify_bundle
        from moec.core.outputs import work_dir
        from moec.artifact.resident_keys import SUFFIX, cache_key, param_key
        from moec.runtime.session import new_cache
        from moec.runtime.tensor_holder import TensorHolder

        self.manifest = verify_bundle(self.path)  # again: the bundle may have changed since it was queued
        with work_dir("moec-upload-") as private:
            remote.upload(str(verified_copy(self.path, "lib.so", self.manifest, private)), "moec_lib.so")
        lib = remote.load_module("moec_lib.so")
        dev = _remote_device(remote, self.manifest["target"]["tvm_target"].get("kind", "llvm"))
        vm = tvm.runtime.vm.VirtualMachine(lib, dev)
        from moec.artifact.weights_file import device_params
        params = device_params(self.path, self.manifest["params"], dev, zero_copy=False)
        stream = list(self.token_stream(protocol))
        # the timer runs each step's call number x repeat times more, each writing row pos again
        cache = new_cache(self.cfg, max(1, len(stream)), dev)
        holder = TensorHolder.for_bundle(remote, self.manifest)
        if holder is not None:  # weights and caches held on the device: a call sends the token and position
            holder.hold(params, param_key)
            holder.hold(cache, cache_key)
        entry = "decode" + SUFFIX if holder is not None else "decode"
        per_step = []
        with _DeviceEnergy(remote, energy_spec) as energy:
            for pos, tok in enumerate(stream):
                held = [] if holder is not None else [*cache, *params]  # else set_input copies them every call
                vm.set_input(entry, tvm.runtime.tensor(np.array([tok], np.int32), dev),
                             tvm.runtime.tensor(np.array([pos], np.int64), dev), *held)
                timer = vm.time_evaluator("invoke_stateful", dev, number=protocol.number, repeat=protocol.repeat)
                per_step.append(list(timer(entry).results))
                vm.invoke_stateful(entry)
                if holder is None:  # set_input copied the caches: keep the ones the call wrote
                    out = vm.get_outputs(entry)
                    cache = [out[i] for i in range(1, 1 + len(cache))]
        if holder is not None:
            holder.release()
        times = np.asarray(per_step)  # [steps, repeats]
        # each repeat: mean step time over the stream; best: every step at its fastest repeat (on a
        # shared machine other processes only ever add time)
        return Timing(times.mean(axis=0).tolist(), energy.reading, float(times.min(axis=1).mean()))

    def modelled_energy_j(self, preset, frequencies: np.ndarray | None = None) -> float:
        cfg = MoEConfig(**self.cfg)
        return decode_energy_j(cfg, BitPlan.from_json(self.manifest["plan"]), preset.energy_model, frequencies)


@dataclass
class KernelCandidate:
    """One decode GEMV kernel class: ``bits`` x [n, k], a stack of ``stacked`` experts, ``top_k`` rows,
    of which ``routed`` read distinct experts; the other rows have id -1 (routed to another bit class),
    as in the decode graph, and do no work in a row-guarded kernel."""

    bits: int
    n: int
    k: int
    group_size: int
    stacked: int
    top_k: int
    routed: int
    per_expert: bool = False
    target: str = "host"
    label: str = ""
    kind: str = field(default="kernel", init=False)
    _lib: Path | None = field(default=None, init=False, repr=False)
    _script_sha: str | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.routed <= min(self.top_k, self.stacked):
            raise MoecError(f"routed must be in [0, min(top_k, stacked)], got {self.routed}")
        self.label = self.label or f"b{self.bits} {self.n}x{self.k} m{self.routed}"

    def _func(self):
        preset = load_target(self.target)
        tvm_target = preset.tvm()
        return preset, tvm_target, make_gemv(self.bits, self.n, self.k, self.group_size, self.stacked, self.top_k,
                                             tvm_target, x_per_expert=self.per_expert)

    def fingerprint(self, protocol: Protocol) -> str:
        if self._script_sha is None:
            _, tvm_target, func = self._func()
            self._script_sha = hashlib.sha256((func.script() + str(tvm_target)).encode()).hexdigest()
        spec = {k: getattr(self, k) for k in ("bits", "n", "k", "group_size", "stacked", "top_k", "routed",
                                              "per_expert", "target")}
        return _sha({"kind": self.kind, "spec": spec, "tir": self._script_sha, "protocol": protocol.key()})

    def prepare(self, workdir: Path) -> None:
        """Compile the kernel to a shared library in ``workdir`` (once)."""
        with self._lock:
            if self._lib is not None and self._lib.is_file():
                return
            preset, tvm_target, func = self._func()
            mod = compile_kernel(func, tvm_target)
            fd, name = tempfile.mkstemp(suffix=".so", dir=workdir, prefix="gemv-")
            os.close(fd)
            if preset.cross_compiler:
                from tvm.support import cc
                mod.export_library(name, fcompile=cc.cross_compiler(preset.cross_compiler))
            else:
                mod.export_library(name)
            self._lib = Path(name)

    def arrays(self) -> list[np.ndarray]:
        """Random inputs in the kernel layout (timing does not depend on the values)."""
        tile = kernel_tile(load_target(self.target).tvm(), self.n, self.bits, "float32")  # make_gemv's default
        rng = np.random.default_rng(0)
        nb, e, k = num_tiles(self.n, tile), self.stacked, self.k
        rows = self.top_k if self.per_expert else 1
        x = rng.standard_normal((rows, k)).astype(np.float32)
        ids = np.full(self.top_k, -1, np.int32)
        ids[:self.routed] = np.arange(self.routed)
        y = np.zeros((self.top_k, self.n), np.float32)
        if self.bits == 16:
            return [x, rng.standard_normal((e, nb, k, tile)).astype(np.float16), ids, y]
        groups = k // self.group_size
        words = rng.integers(0, 2**32, (e, nb, k * self.bits // 32, tile), dtype=np.uint32)
        scale = (rng.random((e, nb, groups, tile), dtype=np.float32) * 0.01 + 1e-3).astype(np.float16)
        zero = rng.integers(0, 2**32, (e, nb, zero_words(groups, self.bits), tile), dtype=np.uint32)
        return [x, words, scale, zero, ids, y]

    def run(self, remote, protocol: Protocol, energy_spec: dict | None) -> Timing:
        import tvm

        if self._lib is None:
            raise RuntimeError("prepare() the kernel candidate first")
        name = f"moec_{self._lib.name}"
        remote.upload(str(self._lib), name)
        lib = remote.load_module(name)
        dev = remote.cpu()
        args = [tvm.runtime.tensor(a, dev) for a in self.arrays()]
        if protocol.flush_bytes:  # weights evicted from the private caches, as between decode steps
            timer = lib.time_evaluator("gemv", dev, number=1, repeat=protocol.repeat * protocol.number,
                                       cache_flush_bytes=protocol.flush_bytes)
        else:
            timer = lib.time_evaluator("gemv", dev, number=protocol.number, repeat=protocol.repeat,
                                       min_repeat_ms=10)
        with _DeviceEnergy(remote, energy_spec) as energy:
            samples = list(timer(*args).results)
        return Timing(samples, energy.reading)


def _remote_device(remote, kind: str):
    """The session's device for a TVM target kind (LLVM targets run on the CPU)."""
    devices = {"llvm": remote.cpu, "c": remote.cpu, "cuda": remote.cuda, "opencl": remote.cl,
               "vulkan": remote.vulkan, "metal": remote.metal, "rocm": remote.rocm}
    if kind not in devices:
        raise MoecError(f"no RPC device for target kind '{kind}'; choices: {', '.join(devices)}")
    return devices[kind]()


class _DeviceEnergy:
    """Runs the device's energy sampler (``moec.energy.start/stop``) around a block, if it has one."""

    def __init__(self, remote, spec: dict | None) -> None:
        self.remote, self.spec, self.handle, self.reading = remote, spec, "", None
        self._stop = None

    def __enter__(self) -> "_DeviceEnergy":
        if self.spec is None:
            return self
        try:
            start = self.remote.get_function("moec.energy.start")
            self._stop = self.remote.get_function("moec.energy.stop")
        except (AttributeError, RuntimeError):
            return self  # a stock server: no device-side sampler
        self.handle = str(start(json.dumps(self.spec)))
        return self

    def __exit__(self, exc_type, *_) -> None:
        if self.handle and self._stop is not None and exc_type is None:
            self.reading = json.loads(str(self._stop(self.handle)))
