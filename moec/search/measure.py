"""Measurers for hardware in the loop: compile a plan into a bundle and time its decode steps.

* ``LocalBundleMeasurer`` — builds a host bundle with TVM and times greedy decode steps here
  (median over repeats). Energy is not measured (``energy_source`` = ``modelled``).
* ``FarmMeasurer`` — builds a bundle for the target and times it on a farm device through
  ``moec.hardware.device_timing.measure_bundles`` (the device-farm stage).

Both return :class:`moec.search.estimator.PlanMeasurement` in seconds/joules per decode step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import tempfile
from pathlib import Path

from moec.core.errors import MoecError
from moec.hardware.device_timing import measure_bundles
from moec.hardware.store import MeasurementStore
from moec.lower.bundler import PlanBundler
from moec.runtime.session import BundleSession
from moec.search.estimator import PlanMeasurement
from moec.core.plan import BitPlan

log = logging.getLogger("moec")


def _plan_key(plan: BitPlan) -> str:
    blob = json.dumps({"experts": plan.to_json()["experts"], "tensors": plan.tensors, "g": plan.group_size,
                       "m": plan.method}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def time_decode(bundle: str | os.PathLike, steps: int = 32, repeats: int = 3, prompt: list[int] | None = None
                ) -> tuple[float, float]:
    """Median and spread (max - min) of seconds per decode step of ``bundle`` on this machine."""
    sess = BundleSession(bundle)
    ids = prompt or [1, 2, 3, 4]
    sess.generate(ids, 4)  # warm-up
    per = []
    for _ in range(repeats):
        _, st = sess.generate(ids, steps)
        if st.new_tokens > 1:
            per.append(st.decode_seconds / (st.new_tokens - 1))
    if not per:
        raise MoecError(f"bundle '{bundle}' stopped before a second token; cannot time decode")
    return statistics.median(per), max(per) - min(per)


class LocalBundleMeasurer:
    """Compile each plan for ``target`` here and time its decode (bundles cached by plan hash)."""

    def __init__(self, checkpoint: str | os.PathLike, target: str = "host", workdir: str | os.PathLike | None = None,
                 steps: int = 32, repeats: int = 3) -> None:
        self.checkpoint, self.target, self.steps, self.repeats = checkpoint, target, steps, repeats
        self.bundler = PlanBundler(checkpoint, target)
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="moec-measure-")
        self.workdir = Path(workdir or self._tmp.name)

    def __call__(self, plan: BitPlan) -> PlanMeasurement:
        bundle = self.workdir / f"bundle-{_plan_key(plan)}"
        if not (bundle / "manifest.json").is_file():
            self.bundler(plan, bundle)
        median, spread = time_decode(bundle, self.steps, self.repeats)
        log.info("local measurement: %.3f ms/step (spread %.3f ms)", median * 1e3, spread * 1e3)
        return PlanMeasurement(median, None, "measured", "modelled")


class FarmMeasurer:
    """Compile each plan for ``target`` and time it on a device of the farm (``tracker`` = host:port)."""

    def __init__(self, checkpoint: str | os.PathLike, target: str, tracker: str, store: str | os.PathLike,
                 workdir: str | os.PathLike, repeats: int = 5) -> None:
        self.bundler = PlanBundler(checkpoint, target)
        self.checkpoint, self.target, self.tracker = checkpoint, target, tracker
        self.store, self.workdir, self.repeats = Path(store), Path(workdir), repeats
        self.workdir.mkdir(parents=True, exist_ok=True)

    def __call__(self, plan: BitPlan) -> PlanMeasurement:
        bundle = self.workdir / f"bundle-{_plan_key(plan)}"
        if not (bundle / "manifest.json").is_file():
            self.bundler(plan, bundle)
        key = self.bundler.preset.rpc_key
        store = MeasurementStore(self.store)  # every measurement is stored before it is used
        try:
            (m,) = measure_bundles(self.tracker, key, [bundle], store, self.repeats)
        finally:
            store.close()
        if m.status != "ok" or m.median_s is None:
            raise MoecError(f"farm measurement of the plan failed ({m.status}): {getattr(m, 'detail', '')}")
        return PlanMeasurement(float(m.median_s), getattr(m, "energy_j_per_token", None), "measured",
                           getattr(m, "energy_source", "modelled"))
