"""What every search policy gets (SearchContext) and shared moves: budget repair and local improvement."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from moec.search.cost import CostBreakdown, CostFunction
from moec.search.estimator import CorrectedEstimator, PlanMeasurement
from moec.search.problem import SearchProblem

log = logging.getLogger("moec")

#: A device measurement of a plan (BitPlan -> PlanMeasurement): local bundle timing or the farm.
Measurer = Callable[["object"], PlanMeasurement]

MAX_VISITED = 4000


@dataclass
class SearchContext:
    """The problem, its cost, and the run's knobs, shared by every policy."""

    problem: SearchProblem
    cost: CostFunction
    seed: int = 0
    episodes: int = 300
    batch: int = 16
    measurer: Measurer | None = None
    measure_every: int = 50
    state_path: str | None = None
    checkpoint_every: int = 10
    progress: bool = False
    on_episode: Callable[[int], None] | None = None   # called after each finished episode (tests, UIs)
    visited: dict[tuple, dict] = field(default_factory=dict)
    measured: dict[tuple, dict] = field(default_factory=dict)

    def evaluate(self, assign: np.ndarray, source: str) -> CostBreakdown:
        """Cost of ``assign``, recorded as a visited plan (for the Pareto plot)."""
        br = self.cost.evaluate(assign)
        key = tuple(int(a) for a in assign)
        if key not in self.visited and len(self.visited) < MAX_VISITED:
            self.visited[key] = {"source": source, **br.to_json()}
        return br

    def measure(self, assign: np.ndarray) -> dict | None:
        """Measure ``assign`` on the device (once per plan) and correct the estimator with it."""
        if self.measurer is None:
            return None
        key = tuple(int(a) for a in assign)
        if key in self.measured:
            return self.measured[key]
        m = self.measurer(self.problem.to_plan(assign))
        est = self.cost.estimator
        if isinstance(est, CorrectedEstimator):
            est.add(self.problem, assign, m)
        self.measured[key] = {"latency_s": m.latency_s, "energy_j": m.energy_j, "label": m.label,
                              "energy_source": m.energy_source}
        log.info("measured plan: %.3f ms/step (%s)", m.latency_s * 1e3, m.label)
        return self.measured[key]


class Policy(Protocol):
    """A search policy: returns an assignment (index into ``problem.bits`` per expert) within budget."""

    name: str
    iterative: bool

    def run(self, ctx: SearchContext) -> np.ndarray: ...


def repair(problem: SearchProblem, coef: np.ndarray, assign: np.ndarray) -> np.ndarray:
    """Lower bits until the plan fits the budget, each step the cheapest added cost per byte saved."""
    a = np.array(assign, dtype=np.int64)
    rows = np.arange(problem.n)
    over = problem.memory(a) - problem.budget_bytes
    while over > 0:
        can = a > 0
        if not can.any():
            break
        lower = np.where(can, a - 1, 0)
        saved = (problem.nbytes[rows, a] - problem.nbytes[rows, lower]).astype(float)
        added = coef[rows, lower] - coef[rows, a]
        ratio = np.where(can & (saved > 0), added / np.maximum(saved, 1), np.inf)
        i = int(np.argmin(ratio))
        if not np.isfinite(ratio[i]):
            break
        a[i] -= 1
        over -= int(saved[i])
    return a


def improve(ctx: SearchContext, assign: np.ndarray, pairs: bool = True, max_pair_space: int = 512) -> np.ndarray:
    """Local search on the true cost: best single-expert bit change, then (small problems) best
    pair change (one expert up, another down), repeated until no move lowers the cost."""
    p = ctx.problem
    a = np.array(assign, dtype=np.int64)
    best = ctx.evaluate(a, "polish").total
    moves = [(i, j) for i in range(p.n) for j in range(p.m)]
    while True:
        cand, cand_cost = None, best
        for i, j in moves:
            if j == a[i]:
                continue
            b = a.copy()
            b[i] = j
            if not p.feasible(b):
                continue
            c = ctx.evaluate(b, "polish").total
            if c < cand_cost - 1e-12:
                cand, cand_cost = b, c
        if cand is None and pairs and p.n * p.m <= max_pair_space:
            for i in range(p.n):
                for j in range(a[i] + 1, p.m):
                    up = p.nbytes[i, j] - p.nbytes[i, a[i]]
                    for k in range(p.n):
                        if k == i:
                            continue
                        for l in range(a[k]):
                            if p.memory(a) + up - (p.nbytes[k, a[k]] - p.nbytes[k, l]) > p.budget_bytes:
                                continue
                            b = a.copy()
                            b[i], b[k] = j, l
                            c = ctx.evaluate(b, "polish").total
                            if c < cand_cost - 1e-12:
                                cand, cand_cost = b, c
        if cand is None:
            return a
        a, best = cand, cand_cost
