"""Latency simulator: per-target kernel-time tables from the farm, composed into a decode-step estimate.

The decode graph (``moec.lower.decode_graph``) calls, per MoE layer and per bit class present
in the layer, three GEMV kernels (w1, w3, w2) with ``top_k`` rows. ``m`` routed experts of the
class are read once each; rows routed to other classes do no work (the kernels' row guard,
``moec.lower.kernels.row_guard``), so a call with ``m = 0`` costs only its launch and activation
preparation. So a step costs

    base + Σ_non-expert GEMV(bits, N, K)
         + Σ_layers Σ_classes [per_class + Σ_proj E_m[ GEMV_c(bits, N, K, m) ]]

where ``m`` (routed experts of the class) is Poisson-binomial over the class' members'
routing frequencies (capped at ``top_k``). The GEMV tables are measured per bit class and
shape on the farm; ``base`` (attention, norms, router, embedding lookup, VM dispatch) and
``per_class`` (the dispatch ops around each class) are fitted by least squares to measured
decode steps of calibration bundles.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moec.core.errors import MoecError
from moec.core.formats import DEFAULT_ALLOWED
from moec.core.config import MoEConfig
from moec.core.io import atomic_write_json, read_json
from moec.core.plan import BitPlan, uniform_plan
from moec.core.targets import load_target
from moec.hardware.candidates import BundleCandidate, Protocol
from moec.hardware.energy_model import decode_energy_j, frequency_rows
from moec.hardware.kernel_classes import dense_weights, expert_kernels, kernel_candidates
from moec.hardware.device_timing import DeviceTimer, measure_rounds
from moec.hardware.simulator_fit import build_bundles, routing_frequencies

log = logging.getLogger("moec.farm")
SIM_VERSION = 2  # 2: expert tables cover m = 0..top_k (row-guarded kernels)


def routed_count_dist(p: np.ndarray, top_k: int) -> np.ndarray:
    """P(m routed) for m = 0..top_k: independent Bernoulli(p_e) members, the tail folded into top_k."""
    dist = np.array([1.0])
    for pe in np.clip(np.asarray(p, float), 0.0, 1.0):
        dist = np.convolve(dist, [1.0 - pe, pe])
    out = np.zeros(top_k + 1)
    out[:min(len(dist), top_k + 1)] = dist[:top_k + 1]
    out[top_k] += dist[top_k + 1:].sum()
    return out


@dataclass
class LatencySimulator:
    """Seconds per decode step of a plan on one target/device key, from farm-measured tables."""

    target: str
    device_key: str
    model_fingerprint: str
    group_size: int
    top_k: int
    expert_s: dict[str, list[float]] = field(default_factory=dict)   # "bits,N,K,pe" -> [t(m=0..top_k)]
    dense_s: dict[str, float] = field(default_factory=dict)          # "bits,N,K" -> t (one row)
    unsupported: list[str] = field(default_factory=list)             # dense "bits,N,K" run by reference code
    base_s: float = 0.0
    per_class_s: float = 0.0
    watts: float | None = None      # mean device power while decoding, when the farm measured it
    calibration: dict = field(default_factory=dict)

    # -- prediction ----------------------------------------------------------------
    def _dense_part(self, cfg: MoEConfig, plan: BitPlan) -> float:
        total = 0.0
        for name, (n, k) in dense_weights(cfg):
            key = f"{plan.tensor_bits(name)},{n},{k}"
            if key in self.dense_s:
                total += self.dense_s[key]
            elif key not in self.unsupported:
                raise MoecError(f"the simulator has no kernel time for {name} at {key.split(',')[0]} bits "
                                f"({n}x{k}); calibrate it with those bits")
        return total

    def _expert_part(self, cfg: MoEConfig, plan: BitPlan, frequencies) -> tuple[float, int]:
        total, classes = 0.0, 0
        rows = frequency_rows(cfg, frequencies)
        for layer, f in rows.items():
            bits = np.array([plan.experts[layer][e] for e in range(cfg.num_experts)])
            for c in sorted(set(bits.tolist())):
                dist = routed_count_dist(f[bits == c], self.top_k)
                classes += 1
                for n, k, pe in expert_kernels(cfg):
                    key = f"{c},{n},{k},{int(pe)}"
                    if key not in self.expert_s:
                        raise MoecError(f"the simulator has no kernel time for {c}-bit experts ({n}x{k}); "
                                        f"calibrate it with those bits")
                    t = self.expert_s[key]
                    total += sum(dist[m] * t[m] for m in range(self.top_k + 1))
        return total, classes

    def breakdown(self, cfg: MoEConfig, plan: BitPlan, frequencies: np.ndarray | None) -> dict[str, float]:
        """The parts of :meth:`predict` (seconds)."""
        self._check(cfg, plan)
        experts, classes = self._expert_part(cfg, plan, frequencies)
        dense = self._dense_part(cfg, plan)
        return {"base": self.base_s, "dense": dense, "experts": experts, "classes": classes,
                "dispatch": classes * self.per_class_s,
                "total": self.base_s + dense + experts + classes * self.per_class_s}

    def predict(self, cfg: MoEConfig, plan: BitPlan, frequencies: np.ndarray | None) -> float:
        """Seconds per decode step of ``plan`` with routing ``frequencies`` ([L, E], P(routed) per token)."""
        return self.breakdown(cfg, plan, frequencies)["total"]

    def energy(self, cfg: MoEConfig, plan: BitPlan, frequencies: np.ndarray | None) -> tuple[float, str]:
        """(joules per decode step, "measured" | "modelled").

        With device power measured during calibration: that power x the predicted step time;
        otherwise the target preset's energy model (bytes x pJ/byte + ops x pJ/op).
        """
        if self.watts is not None:
            return self.watts * self.predict(cfg, plan, frequencies), "measured"
        return decode_energy_j(cfg, plan, load_target(self.target).energy_model, frequencies), "modelled"

    def _check(self, cfg: MoEConfig, plan: BitPlan) -> None:
        if cfg.fingerprint() != self.model_fingerprint:
            raise MoecError(f"simulator was calibrated for model {self.model_fingerprint}, not {cfg.fingerprint()}")
        if plan.group_size != self.group_size:
            raise MoecError(f"simulator was calibrated at group size {self.group_size}, the plan uses "
                            f"{plan.group_size}")

    # -- fitting -------------------------------------------------------------------
    def fit_overheads(self, cfg: MoEConfig, rows: list[tuple[BitPlan, np.ndarray | None, float]]) -> None:
        """Fit ``base_s`` and ``per_class_s`` to measured (plan, frequencies, seconds per step) rows."""
        a, y = [], []
        for plan, freq, measured in rows:
            experts, classes = self._expert_part(cfg, plan, freq)
            a.append([1.0, classes])
            y.append(measured - experts - self._dense_part(cfg, plan))
        a, y = np.asarray(a), np.asarray(y)
        if len(set(a[:, 1])) > 1:
            coef, *_ = np.linalg.lstsq(a, y, rcond=None)
            if coef[1] < 0:  # dispatch cannot be negative: refit the base alone
                coef = np.array([y.mean(), 0.0])
        else:
            coef = np.array([y.mean(), 0.0])
        self.base_s, self.per_class_s = float(coef[0]), float(coef[1])

    # -- persistence ---------------------------------------------------------------
    def to_json(self) -> dict:
        return {"version": SIM_VERSION, **{k: getattr(self, k) for k in self.__dataclass_fields__}}

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LatencySimulator":
        d = read_json(path, "simulator")
        if d.pop("version", None) != SIM_VERSION:
            raise MoecError(f"simulator '{path}' is not a version-{SIM_VERSION} moec simulator file")
        try:
            return cls(**d)
        except TypeError as exc:
            raise MoecError(f"simulator '{path}' is malformed: {exc}") from None

    # -- calibration on the farm ---------------------------------------------------
    @classmethod
    def calibrate(cls, tracker: str, key: str, cfg: MoEConfig, *, checkpoint: str | os.PathLike, store,
                  target: str = "host", bits: tuple[int, ...] | None = None, group_size: int = 64,
                  method: str = "rtn", plans: list[BitPlan] | None = None, tokens: list[int] | None = None,
                  steps: int = 16, repeats: int = 7, workdir: str | os.PathLike | None = None,
                  flush_bytes: int = 16 << 20, statistic: str = "best", rounds: int = 3,
                  progress: bool = False) -> "LatencySimulator":
        """Measure kernel tables and calibration bundles of ``checkpoint`` on ``key`` devices; fit.

        ``plans`` default to :func:`calibration_plans`; ``tokens`` (the decode stream timed) default
        to a fixed pseudo-random stream of ``steps`` ids. Kernels are timed one call at a time after
        flushing ``flush_bytes`` of cache: within a decode step each weight is read once, after the
        rest of the model went through the cache, not from a hot loop. ``statistic`` is the
        measurement statistic fitted: ``"best"`` (fastest repeats; robust on a shared machine,
        where other processes only add time) or ``"median"``. Bundles are measured in ``rounds``
        interleaved rounds and the smallest per bundle is kept (a burst of load on a shared
        machine then has to hit every round of a bundle to bias it).
        """
        if statistic not in ("best", "median"):
            raise MoecError(f"unknown statistic '{statistic}'; choices: best, median")
        stat = f"{statistic}_s"
        preset = load_target(target)
        bits = tuple(bits or [b for b in preset.allowed_bits if b in DEFAULT_ALLOWED])
        sim = cls(target, key, cfg.fingerprint(), group_size, cfg.top_k)
        expert_c, dense_c, sim.unsupported = kernel_candidates(cfg, bits, group_size, target)
        kprof = DeviceTimer(tracker, key, store, Protocol(5, repeats, flush_bytes=flush_bytes), progress=progress)
        kres = kprof.measure([c for c, _ in expert_c] + [c for c, _ in dense_c])
        for (cand, table_key), m in zip(expert_c + dense_c, kres):
            if m.status != "ok":
                raise MoecError(f"kernel {cand.label} could not be measured ({m.status}: {m.detail})")
            if table_key.count(",") == 3:
                sim.expert_s.setdefault(table_key, [0.0] * (cfg.top_k + 1))[cand.routed] = getattr(m, stat)
            else:
                sim.dense_s[table_key] = getattr(m, stat)
        plans = plans or calibration_plans(cfg, bits, group_size, method)
        stream = tokens or np.random.default_rng(0).integers(0, cfg.vocab_size, steps).tolist()
        with tempfile.TemporaryDirectory(prefix="moec-calib-") as tmp:
            root = Path(workdir) if workdir else Path(tmp)
            bundles = build_bundles(checkpoint, plans, root, target, progress)
            # single-step timings, many of them: the fastest of each step is then rarely disturbed
            bres = measure_rounds(tracker, key, [BundleCandidate(b, stream) for b in bundles], store,
                                  Protocol(1, 5 * repeats, len(stream)), rounds, progress)
        rows = []
        for plan, ms in zip(plans, bres):
            bad = [m for m in ms if m.status != "ok"]
            if bad:
                raise MoecError(f"calibration bundle {bad[0].label} could not be measured "
                                f"({bad[0].status}: {bad[0].detail})")
            rows.append((plan, routing_frequencies(checkpoint, plan, stream), min(getattr(m, stat) for m in ms)))
        sim.fit_overheads(cfg, rows)
        powers = [m.energy_j_per_token / m.median_s for ms in bres for m in ms if m.energy_source == "measured"]
        sim.watts = float(np.median(powers)) if powers else None
        sim.calibration = {"plans": [p.provenance.get("policy", "") for p in plans], "tokens": stream,
                           "statistic": statistic, "flush_bytes": flush_bytes,
                           "measured_s": [r[2] for r in rows],
                           "fitted_s": [sim.predict(cfg, p, f) for p, f, _ in rows]}
        log.info("simulator: base %.3g ms, per class %.3g ms", sim.base_s * 1e3, sim.per_class_s * 1e3)
        return sim


def calibration_plans(cfg: MoEConfig, bits: tuple[int, ...], group_size: int, method: str) -> list[BitPlan]:
    """Plans spanning 1 to len(bits) classes per layer (uniform, and experts cycling through bits)."""
    plans = [uniform_plan(cfg, 4 if 4 in bits else bits[0], group_size, method)]
    for width in sorted({2, min(4, len(bits)), len(bits)} - {1}):
        if width > len(bits):
            continue
        chosen = bits[:width]
        p = plans[0].copy()
        p.experts = {l: {e: chosen[(e + l) % width] for e in range(cfg.num_experts)} for l in cfg.moe_layers}
        p.provenance = {"policy": f"calibration-{width}-classes"}
        plans.append(p)
    return plans


def relative_error(predicted: float, measured: float) -> float:
    return abs(predicted - measured) / measured

