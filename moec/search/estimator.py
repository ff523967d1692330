"""Latency/energy estimators of a plan: the analytic (modelled) default, a pluggable Protocol, measurement correction.

Every estimate carries a ``label`` saying where its numbers come from: ``modelled`` (the
analytic bytes/bandwidth model below), ``simulated`` (the farm's calibrated simulator) or
``measured`` (device timings). A corrected estimator appends ``+corrected(N measurements)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from moec.hardware.simulator import LatencySimulator
from moec.search.problem import SearchProblem

log = logging.getLogger("moec")

#: Defaults of the analytic model when the target preset gives no figures, from the development
#: host's README measurements: the float32-activation GEMV's effective read rate (~50 % of 27.6 GB/s
#: DRAM); the cost of one more (layer, bit class) kernel group (mixed 2/4 decodes ~0.25 ms/step
#: slower than uniform INT4 with 4 more groups: ~60 us each); a fixed per-step cost (VM calls,
#: attention, sampling) that brings uniform INT8/INT4 near their measured ~0.8 ms/step.
DEFAULT_BANDWIDTH_GBPS = 14.0
DEFAULT_KERNEL_OVERHEAD_S = 6e-5
DEFAULT_STEP_OVERHEAD_S = 4.5e-4
DEFAULT_PJ_PER_BYTE = 160.0
DEFAULT_PJ_PER_OP = 4.6


@dataclass
class Estimate:
    """Predicted seconds and joules per decode step, with the latency split into named parts."""

    latency_s: float
    energy_j: float
    label: str
    parts: dict[str, float] = field(default_factory=dict)


@dataclass
class Additive:
    """Per-expert × bits latency/energy coefficients and constants; ``exact`` when nothing else adds."""

    latency: np.ndarray   # [n, m] seconds
    energy: np.ndarray    # [n, m] joules
    latency_const: float
    energy_const: float
    exact: bool


class Estimator(Protocol):
    """What the search needs from a latency/energy source."""

    label: str

    def estimate(self, problem: SearchProblem, assign: np.ndarray) -> Estimate: ...

    def additive(self, problem: SearchProblem) -> Additive: ...


def class_presence(problem: SearchProblem, assign: np.ndarray) -> float:
    """Expected number of (layer, bit class) kernels a decode step launches.

    A class runs only when a token routes to one of its experts; with per-expert routing
    frequencies ``f`` (treated as independent) it runs with probability ``1 - Π(1 - f_e)``.
    """
    miss = np.ones((len(problem.layers), problem.m))
    np.multiply.at(miss, (problem.layer_index, assign), 1.0 - np.clip(problem.frequency, 0.0, 1.0))
    present = np.zeros_like(miss, dtype=bool)
    present[problem.layer_index, assign] = True
    if problem.drops:  # dropped experts launch nothing
        present[:, 0] = False
    return float((1.0 - miss)[present].sum())


@dataclass
class AnalyticEstimator:
    """Modelled decode step: bytes read / bandwidth + kernel launches × overhead; energy from bytes and ops.

    Bytes read per step = non-expert weights (one embedding row) + Σ_e f_e · packed bytes(e, b_e);
    ops = 2 × weight elements used. Every (layer, bit class) with a routed expert costs one
    kernel call (``kernel_overhead_s``); a class no token reaches costs nothing. ``step_overhead_s``
    is a plan-independent cost per step (0 unless set; :meth:`for_target` sets the host default).
    """

    bandwidth_gbps: float = DEFAULT_BANDWIDTH_GBPS
    kernel_overhead_s: float = DEFAULT_KERNEL_OVERHEAD_S
    step_overhead_s: float = 0.0
    pj_per_byte: float = DEFAULT_PJ_PER_BYTE
    pj_per_op: float = DEFAULT_PJ_PER_OP
    label: str = "modelled"

    @classmethod
    def for_target(cls, preset, **overrides) -> "AnalyticEstimator":
        """Constants from a target preset (energy model; bandwidth/overhead where the preset has them)."""
        kw = {"pj_per_byte": preset.energy_model.pj_per_byte, "pj_per_op": preset.energy_model.pj_per_op,
              "step_overhead_s": DEFAULT_STEP_OVERHEAD_S}
        for name in ("bandwidth_gbps", "kernel_overhead_s", "step_overhead_s"):
            value = getattr(preset, name, None)
            if value:
                kw[name] = float(value)
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)

    def _bytes_and_ops(self, problem: SearchProblem, assign: np.ndarray) -> tuple[float, float]:
        routed = problem.read_bytes[np.arange(problem.n), assign]
        nbytes = problem.step_fixed_bytes + float(problem.frequency @ routed)
        ops = 2.0 * (problem.step_fixed_params + problem.params_per_expert * problem.frequency.sum())
        return nbytes, ops

    def estimate(self, problem: SearchProblem, assign: np.ndarray) -> Estimate:
        nbytes, ops = self._bytes_and_ops(problem, assign)
        kernels = class_presence(problem, assign)
        t_bytes = nbytes / (self.bandwidth_gbps * 1e9)
        t_kern = kernels * self.kernel_overhead_s
        energy = (nbytes * self.pj_per_byte + ops * self.pj_per_op) * 1e-12
        return Estimate(t_bytes + t_kern + self.step_overhead_s, energy, self.label,
                        {"bytes": t_bytes, "kernels": t_kern, "kernel_count": kernels, "step": self.step_overhead_s})

    def additive(self, problem: SearchProblem) -> Additive:
        per = problem.frequency[:, None] * problem.read_bytes
        ops = 2.0 * (problem.step_fixed_params + problem.params_per_expert * problem.frequency.sum())
        lat = per / (self.bandwidth_gbps * 1e9)
        en = per * self.pj_per_byte * 1e-12
        # the launch term is not additive; its additive stand-in charges every layer's
        # classes once at the plan-independent minimum (one class per layer)
        const_t = problem.step_fixed_bytes / (self.bandwidth_gbps * 1e9) + \
            len(problem.layers) * self.kernel_overhead_s + self.step_overhead_s
        const_e = (problem.step_fixed_bytes * self.pj_per_byte + ops * self.pj_per_op) * 1e-12
        return Additive(lat, en, const_t, const_e, exact=self.kernel_overhead_s == 0)


@dataclass
class PlanMeasurement:
    """One device measurement of a plan (seconds and joules per decode step)."""

    latency_s: float
    energy_j: float | None
    label: str = "measured"
    energy_source: str = "measured"


#: Weight of the pull toward the base model's coefficients in the correction fit (per measurement).
RIDGE = 0.1


class CorrectedEstimator:
    """An estimator corrected by device measurements of visited plans (hardware in the loop).

    With fewer measurements than fitted parts the whole prediction is scaled by the geometric
    mean of measured/predicted; with enough (three distinct plans), measured latency is fitted
    as a non-negative combination of the base model's parts (bytes time, expected kernel-group
    count, a constant), so measurements can re-weight bandwidth against launch overhead, which
    changes which plans are best, not only the scale.
    """

    def __init__(self, base: Estimator) -> None:
        self.base = base
        self.records: list[dict] = []
        self._coef: np.ndarray | None = None
        self._energy_scale = 1.0

    @property
    def label(self) -> str:
        if not self.records:
            return self.base.label
        return f"{self.base.label}+corrected({len(self.records)} measurement{'s' * (len(self.records) > 1)})"

    def _features(self, est: Estimate) -> np.ndarray:
        if "bytes" in est.parts and "kernel_count" in est.parts:
            return np.array([est.parts["bytes"], est.parts["kernel_count"], 1.0])
        return np.array([est.latency_s])

    def add(self, problem: SearchProblem, assign: np.ndarray, m: PlanMeasurement) -> None:
        est = self.base.estimate(problem, assign)
        count = est.parts.get("kernel_count", 0.0)
        prior = [1.0, est.parts.get("kernels", 0.0) / count if count else 0.0, est.parts.get("step", 0.0)]
        self.records.append({"assign": [int(a) for a in assign], "features": self._features(est).tolist(),
                             "prior": prior,
                             "predicted_s": est.latency_s, "measured_s": m.latency_s,
                             "predicted_j": est.energy_j, "measured_j": m.energy_j, "label": m.label})
        self._fit()

    def _fit(self) -> None:
        from scipy.optimize import nnls

        recs = self.records
        self._coef = None
        if recs:
            x = np.array([r["features"] for r in recs])
            y = np.array([r["measured_s"] for r in recs])
            distinct = len({tuple(r["assign"]) for r in recs})
            if x.shape[1] > 1 and distinct >= x.shape[1]:
                # ridge toward the base model's own coefficients (features scaled to mean 1): where the
                # measured plans are too alike to separate the parts, the fit stays near the model
                prior = np.array(recs[-1]["prior"])
                scale = np.abs(x).mean(axis=0)
                scale[scale == 0] = 1.0
                k = x.shape[1]
                a = np.vstack([x / scale, RIDGE * np.sqrt(len(recs)) * np.eye(k)])
                b = np.concatenate([y, RIDGE * np.sqrt(len(recs)) * prior * scale])
                self._coef = nnls(a, b)[0] / scale
        energies = [(r["measured_j"], r["predicted_j"]) for r in recs if r["measured_j"] is not None]
        self._energy_scale = float(np.exp(np.mean([np.log(m / p) for m, p in energies]))) if energies else 1.0

    def _latency_scale(self) -> float:
        return float(np.exp(np.mean([np.log(r["measured_s"] / r["predicted_s"]) for r in self.records])))

    def estimate(self, problem: SearchProblem, assign: np.ndarray) -> Estimate:
        est = self.base.estimate(problem, assign)
        if not self.records:
            return est
        if self._coef is not None:
            lat = float(self._features(est) @ self._coef)
        else:
            lat = est.latency_s * self._latency_scale()
        return Estimate(lat, est.energy_j * self._energy_scale, self.label, dict(est.parts))

    def additive(self, problem: SearchProblem) -> Additive:
        add = self.base.additive(problem)
        if not self.records:
            return add
        scale = self._latency_scale() if self._coef is None else float(self._coef[0])
        return Additive(add.latency * scale, add.energy * self._energy_scale, add.latency_const * scale,
                        add.energy_const * self._energy_scale, exact=False)

    # -- persistence (search checkpoints) --------------------------------------------
    def state(self) -> list[dict]:
        return [dict(r) for r in self.records]

    def load_state(self, records: list[dict]) -> None:
        self.records = [dict(r) for r in records]
        self._fit()


class SimulatorEstimator:
    """The farm's calibrated ``LatencySimulator`` for latency (label ``simulated``); energy stays modelled."""

    label = "simulated"

    def __init__(self, simulator, cfg, energy: AnalyticEstimator) -> None:
        self.simulator, self.cfg, self.energy = simulator, cfg, energy

    @classmethod
    def load(cls, path, cfg, energy: AnalyticEstimator) -> "SimulatorEstimator":
        return cls(LatencySimulator.load(path), cfg, energy)

    def estimate(self, problem: SearchProblem, assign: np.ndarray) -> Estimate:
        freq = np.zeros((self.cfg.num_layers, self.cfg.num_experts))
        for (l, e), f in zip(problem.items, problem.frequency):
            freq[l, e] = f
        lat = float(self.simulator.predict(self.cfg, problem.to_plan(assign), freq))
        return Estimate(lat, self.energy.estimate(problem, assign).energy_j, self.label, {"simulated": lat})

    def additive(self, problem: SearchProblem) -> Additive:
        add = self.energy.additive(problem)
        add.exact = False
        return add
