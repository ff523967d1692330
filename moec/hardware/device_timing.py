"""Device timing on the farm: measure candidates (bundles, GEMV kernels) on the devices of one tracker key, in parallel.

One worker thread per device of the key; each asks the tracker (a fresh, bounded connection per
request) for a device per candidate (the stock tracker schedules; moec never does). Every
result is committed to the :class:`MeasurementStore` before anyone sees it, and a candidate
already in the store costs no device time.

Faults: a session that dies (server killed, device rebooted) puts the candidate back in the
queue, to be measured again on whichever device of the key the tracker hands out next, up
to ``max_attempts``; a session that outlives ``timeout_s`` is ended by the server and
recorded as ``timeout`` (final, never retried); no free device within ``wait_s`` is an error.
"""

from __future__ import annotations

import gc
import logging
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from moec.core.errors import MoecError
from moec.core.targets import TargetPreset, load_target
from moec.hardware.candidates import BundleCandidate, KernelCandidate, Protocol, Timing
from moec.hardware.store import Measurement, MeasurementStore, claim_owner
from moec.hardware.tracker_client import connect, request_device, tracker_status
from moec.quant.pack import packed_nbytes

log = logging.getLogger("moec.farm")

Candidate = BundleCandidate | KernelCandidate


def spread(samples: Sequence[float]) -> tuple[float, float]:
    """(median, interquartile range) of ``samples``."""
    a = np.asarray(samples, dtype=float)
    q1, med, q3 = np.percentile(a, [25, 50, 75])
    return float(med), float(q3 - q1)


def _preset_of(c: Candidate):
    if isinstance(c, BundleCandidate):
        return TargetPreset.model_validate(c.manifest["target"])
    return load_target(c.target)


def _modelled_energy(c: Candidate, preset) -> float:
    if isinstance(c, BundleCandidate):
        return c.modelled_energy_j(preset)
    nbytes = c.routed * packed_nbytes(c.n, c.k, c.bits, c.group_size)["total"]
    ops = 2.0 * c.top_k * c.n * c.k
    return (nbytes * preset.energy_model.pj_per_byte + ops * preset.energy_model.pj_per_op) * 1e-12


@dataclass
class _Item:
    index: int
    cand: Candidate
    fingerprint: str
    attempts: int = 0


class DeviceTimer:
    """Measures candidates on ``key`` devices of the tracker at ``tracker`` (``HOST:PORT``).

    ``energy_root`` is where the device-side sampler looks for ``/sys`` (``/`` on a real device;
    a fixture directory in tests). ``device_requests`` counts sessions asked of the tracker;
    ``in_flight`` maps worker thread names to the server each is measuring on right now.
    """

    def __init__(self, tracker: str, key: str, store: MeasurementStore, protocol: Protocol | None = None,
                 timeout_s: float = 120.0, wait_s: float = 120.0, max_attempts: int = 3,
                 energy_root: str = "/", on_result: Callable[[Measurement], None] | None = None,
                 progress: bool = False, connect_wait_s: float = 10.0) -> None:
        self.tracker, self.key, self.store = tracker, key, store
        self.connect_wait_s = connect_wait_s
        self.protocol = protocol or Protocol()
        self.timeout_s, self.wait_s, self.max_attempts = timeout_s, wait_s, max_attempts
        self.energy_root, self.on_result, self.progress = energy_root, on_result, progress
        self.device_requests = 0
        self.retries = 0
        self.in_flight: dict[str, str] = {}
        self._lock = threading.Lock()
        self._owner = claim_owner()
        self.claim_poll_s = 1.0

    # -- public --------------------------------------------------------------------
    def measure(self, candidates: Sequence[Candidate]) -> list[Measurement]:
        """Measurements of ``candidates`` (in order): from the store where present, else on devices."""
        results: list[Measurement | None] = [None] * len(candidates)
        waiting = [_Item(i, c, c.fingerprint(self.protocol)) for i, c in enumerate(candidates)]
        while waiting:
            todo, waiting = self._claim(waiting, results)
            try:
                self._measure_claimed(todo, results)
            finally:
                for item in todo:
                    self.store.release(item.cand.target, self.key, item.fingerprint, self._owner)
            if waiting:  # another profiler on this store is measuring these: take its numbers
                time.sleep(self.claim_poll_s)
        return [r for r in results if r is not None]

    def _claim(self, items: list[_Item], results: list) -> tuple[list[_Item], list[_Item]]:
        """(items this profiler claimed, items another live profiler holds); stored ones fill ``results``."""
        mine, others = [], []
        ttl = (self.timeout_s + self.wait_s) * self.max_attempts + 60
        for item in items:
            stored = self.store.get(item.cand.target, self.key, item.fingerprint)
            if stored is not None:
                results[item.index] = stored
            elif self.store.claim(item.cand.target, self.key, item.fingerprint, self._owner, ttl):
                mine.append(item)
            else:
                others.append(item)
        return mine, others

    def _measure_claimed(self, todo: list[_Item], results: list) -> None:
        if todo:
            devices = tracker_status(self.tracker, self.connect_wait_s).get(self.key)
            if devices is None or devices.total == 0:
                raise MoecError(f"no device with key '{self.key}' is registered at tracker {self.tracker}")
            with tempfile.TemporaryDirectory(prefix="moec-profile-") as work:
                for item in tqdm(todo, desc="build", disable=not self.progress or len(todo) < 2):
                    item.cand.prepare(Path(work))
                self._run_workers(todo, results, min(devices.total, len(todo)))

    # -- workers -------------------------------------------------------------------
    def _run_workers(self, todo: list[_Item], results: list, workers: int) -> None:
        pending: queue.Queue[_Item] = queue.Queue()
        for item in todo:
            pending.put(item)
        state = {"in_flight": 0, "done": 0}
        bar = tqdm(total=len(todo), desc=f"measure on '{self.key}'", disable=not self.progress)
        errors: list[BaseException] = []

        def take() -> _Item | None:
            while True:
                with self._lock:
                    try:
                        item = pending.get_nowait()
                        state["in_flight"] += 1
                        return item
                    except queue.Empty:
                        if state["in_flight"] == 0:
                            return None
                time.sleep(0.05)  # an in-flight item may yet come back to the queue

        def finish(item: _Item, m: Measurement | None) -> None:
            if m is not None:
                self.store.put(m)  # committed before anyone uses it
                results[item.index] = m
                if self.on_result is not None:
                    self.on_result(m)
            with self._lock:
                if m is None:
                    pending.put(item)
                state["in_flight"] -= 1
                if m is not None:
                    state["done"] += 1
                    bar.update(1)

        def worker() -> None:
            try:
                tracker = connect(self.tracker, self.connect_wait_s)
            except MoecError as exc:
                errors.append(exc)
                return
            while (item := take()) is not None:
                try:
                    m = self._attempt(tracker, item)
                except Exception as exc:  # a bug or a bad candidate: record it, keep the batch going
                    m = self._failed(item, "error", f"{type(exc).__name__}: {exc}", "")
                finish(item, m)

        threads = [threading.Thread(target=worker, name=f"moec-profile-{i}", daemon=True) for i in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        bar.close()
        if errors and any(r is None for r in results):
            exc = errors[0]
            raise exc if isinstance(exc, MoecError) else MoecError(f"profiling failed: {exc}")

    def _attempt(self, tracker, item: _Item) -> Measurement | None:
        """Measure ``item`` once; None means "put it back" (its session died and attempts remain)."""
        c, preset = item.cand, _preset_of(item.cand)
        item.attempts += 1
        with self._lock:
            self.device_requests += 1
        try:
            remote, addr = request_device(tracker, self.key, self.wait_s, self.timeout_s)
        except MoecError as exc:
            return self._failed(item, "error", str(exc), "")
        except Exception as exc:  # the tracker handed out a server that died before it noticed
            return self._retry_or_fail(item, (str(exc).strip().splitlines() or ["?"])[-1], "")
        spec = {"sensors": [s.model_dump() for s in preset.power_sensors], "root": self.energy_root,
                "period_s": 0.02}
        t0 = time.monotonic()
        me = threading.current_thread().name
        self.in_flight[me] = addr
        try:
            timing = c.run(remote, self.protocol, spec)
        except Exception as exc:  # a dead or expired session surfaces as TVMError/RPCError/OSError
            elapsed = time.monotonic() - t0
            msg = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            if "RPCSessionTimeoutError" in str(exc) or (self.timeout_s and elapsed >= 0.95 * self.timeout_s):
                log.warning("%s timed out after %.1f s on %s", c.label, elapsed, addr)
                return self._failed(item, "timeout", f"no result within {self.timeout_s:g} s", addr)
            return self._retry_or_fail(item, msg, addr)
        finally:
            self.in_flight.pop(me, None)
            del remote
            gc.collect()  # the VM and remote tensors hold the session in reference cycles: end it now
        return self._ok(item, preset, timing, addr)

    def _retry_or_fail(self, item: _Item, msg: str, addr: str) -> Measurement | None:
        if item.attempts < self.max_attempts:
            log.warning("%s failed on %s (%s); retrying on another device", item.cand.label, addr or "?", msg)
            with self._lock:
                self.retries += 1
            return None
        return self._failed(item, "error", msg, addr)

    def _ok(self, item: _Item, preset, timing: Timing, addr: str) -> Measurement:
        med, iqr = spread(timing.samples)
        e = timing.energy
        if e and e.get("seconds", 0) > 0 and e.get("joules", 0) > 0:
            energy, source = e["joules"] / e["seconds"] * med, "measured"  # mean power while timing x step
            detail = f"{e['samples']} power samples from {', '.join(e['meters'])}"
        else:
            energy, source, detail = _modelled_energy(item.cand, preset), "modelled", ""
        return Measurement(item.cand.target, self.key, item.fingerprint, item.cand.kind, "ok", med, iqr, timing.best,
                           list(timing.samples), energy, source, item.attempts, addr, detail, item.cand.label,
                           created_at=time.time())

    def _failed(self, item: _Item, status: str, detail: str, addr: str) -> Measurement:
        return Measurement(item.cand.target, self.key, item.fingerprint, item.cand.kind, status, None, None, None, [],
                           None, "modelled", item.attempts, addr, detail, item.cand.label, created_at=time.time())


def measure_rounds(tracker: str, key: str, candidates: Sequence[Candidate], store: MeasurementStore,
                   protocol: Protocol, rounds: int, progress: bool = False, **kwargs) -> list[list[Measurement]]:
    """``rounds`` interleaved passes over ``candidates`` (round r is stored under ``Protocol(round=r)``);
    per candidate, its measurement of every round."""
    from dataclasses import replace
    per_round = [DeviceTimer(tracker, key, store, replace(protocol, round=r), progress=progress, **kwargs)
                 .measure(candidates) for r in range(rounds)]
    return [list(ms) for ms in zip(*per_round)]


def measure_bundles(tracker: str, key: str, bundles: list[Path], store: MeasurementStore, repeats: int = 7,
                    number: int = 5, steps: int = 8, tokens: list[int] | None = None, **kwargs) -> list[Measurement]:
    """Decode-step latency (and energy) of each bundle on ``key`` devices; see :class:`DeviceTimer`."""
    cands = [BundleCandidate(b, tokens) for b in bundles]
    prof = DeviceTimer(tracker, key, store, Protocol(number, repeats, steps), **kwargs)
    return prof.measure(cands)


def measure_kernels(tracker: str, key: str, kernels: list[KernelCandidate], store: MeasurementStore,
                    repeats: int = 7, number: int = 5, **kwargs) -> list[Measurement]:
    """Per-call latency of GEMV kernel classes on ``key`` devices; see :class:`DeviceTimer`."""
    prof = DeviceTimer(tracker, key, store, Protocol(number, repeats), **kwargs)
    return prof.measure(kernels)
