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

from moec.search.problem import SearchProblem

log = logging.getLogger("moec")

#: Defaults of the analytic model when the target preset gives no figures. The bandwidth is the
#: float32-activation GEMV's effective read rate on the development host (README kernel figures:
#: ~50 % of 27.6 GB/s DRAM); the launch overhead is one kernel call per (layer, bit class).
DEFAULT_BANDWIDTH_GBPS = 14.0
DEFAULT_KERNEL_OVERHEAD_S = 4e-6
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
    return float((1.0 - miss)[present].sum())


@dataclass
class AnalyticEstimator:
    """Modelled decode step: bytes read / bandwidth + kernel launches × overhead; energy from bytes and ops.

    Bytes read per step = non-expert weights (one embedding row) + Σ_e f_e · packed bytes(e, b_e);
    ops = 2 × weight elements used. Every (layer, bit class) with a routed expert costs one
    kernel call (``kernel_overhead_s``); a class no token reaches costs nothing.
    """

    bandwidth_gbps: float = DEFAULT_BANDWIDTH_GBPS
    kernel_overhead_s: float = DEFAULT_KERNEL_OVERHEAD_S
    pj_per_byte: float = DEFAULT_PJ_PER_BYTE
    pj_per_op: float = DEFAULT_PJ_PER_OP
    label: str = "modelled"

    @classmethod
    def for_target(cls, preset, **overrides) -> "AnalyticEstimator":
        """Constants from a target preset (energy model; bandwidth/overhead where the preset has them)."""
        kw = {"pj_per_byte": preset.energy_model.pj_per_byte, "pj_per_op": preset.energy_model.pj_per_op}
        for name in ("bandwidth_gbps", "kernel_overhead_s"):
            value = getattr(preset, name, None)
            if value:
                kw[name] = float(value)
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)

    def _bytes_and_ops(self, problem: SearchProblem, assign: np.ndarray) -> tuple[float, float]:
        routed = problem.nbytes[np.arange(problem.n), assign]
        nbytes = problem.step_fixed_bytes + float(problem.frequency @ routed)
        ops = 2.0 * (problem.step_fixed_params + problem.params_per_expert * problem.frequency.sum())
        return nbytes, ops

    def estimate(self, problem: SearchProblem, assign: np.ndarray) -> Estimate:
        nbytes, ops = self._bytes_and_ops(problem, assign)
        kernels = class_presence(problem, assign)
        t_bytes = nbytes / (self.bandwidth_gbps * 1e9)
        t_kern = kernels * self.kernel_overhead_s
        energy = (nbytes * self.pj_per_byte + ops * self.pj_per_op) * 1e-12
        return Estimate(t_bytes + t_kern, energy, self.label,
                        {"bytes": t_bytes, "kernels": t_kern, "kernel_count": kernels})

    def additive(self, problem: SearchProblem) -> Additive:
        per = problem.frequency[:, None] * problem.nbytes
        ops = 2.0 * (problem.step_fixed_params + problem.params_per_expert * problem.frequency.sum())
        lat = per / (self.bandwidth_gbps * 1e9)
        en = per * self.pj_per_byte * 1e-12
        # the launch term is not additive; its additive stand-in charges every layer's
        # classes once at the plan-independent minimum (one class per layer)
        const_t = problem.step_fixed_bytes / (self.bandwidth_gbps * 1e9) + \
            len(problem.layers) * self.kernel_overhead_s
        const_e = (problem.step_fixed_bytes * self.pj_per_byte + ops * self.pj_per_op) * 1e-12
        return Additive(lat, en, const_t, const_e, exact=self.kernel_overhead_s == 0)


@dataclass
class Measurement:
    """One device measurement of a plan (seconds and joules per decode step)."""

    latency_s: float
    energy_j: float | None
    label: str = "measured"
    energy_source: str = "measured"


class CorrectedEstimator:
    """An estimator corrected by device measurements of visited plans (hardware in the loop).

    With one measurement the whole prediction is scaled by measured/predicted; with two or
    more, measured latency is fitted as a non-negative combination of the base model's parts
    (bytes time, kernel launches), so measurements can re-weight bandwidth against launch
    overhead, which changes which plans are best, not only the scale.
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
            return np.array([est.parts["bytes"], est.parts["kernel_count"]])
        return np.array([est.latency_s])

    def add(self, problem: SearchProblem, assign: np.ndarray, m: Measurement) -> None:
        est = self.base.estimate(problem, assign)
        self.records.append({"assign": [int(a) for a in assign], "features": self._features(est).tolist(),
                             "predicted_s": est.latency_s, "measured_s": m.latency_s,
                             "predicted_j": est.energy_j, "measured_j": m.energy_j, "label": m.label})
        self._fit()

    def _fit(self) -> None:
        from scipy.optimize import nnls

        recs = self.records
        if not recs:
            self._coef = None
            return
        x = np.array([r["features"] for r in recs])
        y = np.array([r["measured_s"] for r in recs])
        if len(recs) >= x.shape[1] and np.linalg.matrix_rank(x) == x.shape[1]:
            self._coef, _ = nnls(x, y)
        else:
            self._coef = None
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
        from moec.errors import MoecError
        try:
            from moec.hardware.simulator import LatencySimulator
        except ImportError:
            raise MoecError("the latency simulator (moec.hardware.simulator) is not available in this "
                            "moec; use --estimator analytic") from None
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
