"""The search objective: α·Σ_e w_e·AccuracyLoss(e, b_e) + β·Latency + γ·Energy under a memory budget.

Each term is normalised so α, β, γ are comparable: the accuracy term by the weighted loss of
the all-lowest-bits plan, latency and energy by the base estimator's prediction for the
all-highest-bits plan (fixed when the search starts, so a measurement correction that scales
latency also changes its weight in the cost). Plans over the budget cost ``inf``.

``weighting`` names ``w_e`` (normalised to mean 1):

* ``frequency`` — ``w_e ∝ f_e``: experts that more tokens use weigh more.
* ``inverse-frequency`` — ``w_e ∝ 1/f_e`` (the issue's written formulation; protects rarely used experts).
* ``contribution`` — ``w_e ∝ f_e · c_e``: the expert's expected share of its layer's output per token.
* ``none`` — ``w_e = 1``: the measured sensitivity alone (it already reflects routing).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from moec.core.errors import MoecError
from moec.search.estimator import Additive, Estimator
from moec.search.problem import SearchProblem

#: Chosen by benchmarks/search_weighting.py on the reference model (exact ILP per weighting, same budget,
#: 16,384 held-out tokens, non-expert weights 8-bit): top-1 change vs FP32 at 55 % / 60 % of uniform INT8 MB
#: was contribution -0.66 / -0.29 pt, frequency -0.74 / -0.29, none -0.87 / -0.15, inverse-frequency
#: -0.89 / -0.33. Contribution has the best mean; inverse-frequency (protecting rare experts) is worst at both.
DEFAULT_WEIGHTING = "contribution"


def _frequency(p: SearchProblem) -> np.ndarray:
    return p.frequency


def _inverse_frequency(p: SearchProblem) -> np.ndarray:
    floor = max(p.frequency[p.frequency > 0].min(initial=1.0) / 10, 1e-6)  # never-routed experts: 10x rarest
    return 1.0 / np.maximum(p.frequency, floor)


def _contribution(p: SearchProblem) -> np.ndarray:
    return p.frequency * p.contribution


def _none(p: SearchProblem) -> np.ndarray:
    return np.ones(p.n)


WEIGHTINGS: dict[str, Callable[[SearchProblem], np.ndarray]] = {
    "frequency": _frequency, "inverse-frequency": _inverse_frequency, "contribution": _contribution, "none": _none,
}


def expert_weights(problem: SearchProblem, weighting: str) -> np.ndarray:
    """``w_e`` for every expert, normalised to mean 1 (all ones if the weighting is all zero)."""
    if weighting not in WEIGHTINGS:
        raise MoecError(f"unknown weighting '{weighting}'; choices: {', '.join(WEIGHTINGS)}")
    w = np.asarray(WEIGHTINGS[weighting](problem), dtype=float)
    return w / w.mean() if w.mean() > 0 else np.ones(problem.n)


@dataclass
class CostConfig:
    alpha: float = 1.0
    beta: float = 0.5
    gamma: float = 0.05
    weighting: str = DEFAULT_WEIGHTING

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "gamma"):
            if getattr(self, name) < 0:
                raise MoecError(f"{name} must be >= 0 (got {getattr(self, name)})")
        if self.weighting not in WEIGHTINGS:
            raise MoecError(f"unknown weighting '{self.weighting}'; choices: {', '.join(WEIGHTINGS)}")


@dataclass
class CostBreakdown:
    """One plan's cost and its terms (latency/energy labelled with their source)."""

    total: float
    accuracy: float       # Σ w_e · AccuracyLoss (unnormalised)
    latency_s: float
    energy_j: float
    memory_bytes: int
    feasible: bool
    label: str

    def to_json(self) -> dict:
        return asdict(self)


class CostFunction:
    """Evaluates plans of ``problem`` under ``config`` with latency/energy from ``estimator``."""

    def __init__(self, problem: SearchProblem, config: CostConfig, estimator: Estimator,
                 refs: dict[str, float] | None = None) -> None:
        self.problem, self.config, self.estimator = problem, config, estimator
        self.w = expert_weights(problem, config.weighting)
        self.refs = refs or self._references()
        self.evaluations = 0

    def _references(self) -> dict[str, float]:
        p = self.problem
        low = self.w @ p.loss[:, p.lowest]
        top = self.estimator.estimate(p, np.full(p.n, p.m - 1))
        return {"loss": float(low) if low > 0 else 1.0, "latency_s": top.latency_s or 1.0,
                "energy_j": top.energy_j or 1.0}

    def accuracy(self, assign: np.ndarray) -> float:
        return float(self.w @ self.problem.loss[np.arange(self.problem.n), assign])

    def evaluate(self, assign: np.ndarray) -> CostBreakdown:
        self.evaluations += 1
        p, c = self.problem, self.config
        acc = self.accuracy(assign)
        est = self.estimator.estimate(p, assign)
        mem = p.memory(assign)
        total = (c.alpha * acc / self.refs["loss"] + c.beta * est.latency_s / self.refs["latency_s"]
                 + c.gamma * est.energy_j / self.refs["energy_j"])
        feasible = mem <= p.budget_bytes
        return CostBreakdown(total if feasible else float("inf"), acc, est.latency_s, est.energy_j, mem, feasible,
                             est.label)

    def __call__(self, assign: np.ndarray) -> float:
        return self.evaluate(assign).total

    def additive(self) -> tuple[np.ndarray, float, bool]:
        """Per-expert × bits cost coefficients ``C`` and constant with ``cost = Σ C[i, a_i] + const``.

        The third value says whether this is exact (the estimator is additive) or a stand-in.
        """
        p, c = self.problem, self.config
        add: Additive = self.estimator.additive(p)
        coef = (c.alpha * self.w[:, None] * p.loss / self.refs["loss"] + c.beta * add.latency / self.refs["latency_s"]
                + c.gamma * add.energy / self.refs["energy_j"])
        const = c.beta * add.latency_const / self.refs["latency_s"] + c.gamma * add.energy_const / self.refs["energy_j"]
        return coef, float(const), add.exact
