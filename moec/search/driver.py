"""Search driver: one policy over a SearchProblem → the chosen BitPlan, its cost, and every plan visited."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from moec.core.errors import MoecError
from moec.search.cost import CostBreakdown, CostConfig, CostFunction
from moec.search.estimator import CorrectedEstimator, Estimator
from moec.core.plan import BitPlan
from moec.search.policies import get_policy
from moec.search.policies.base import Measurer, SearchContext
from moec.search.problem import SearchProblem

log = logging.getLogger("moec")


@dataclass
class SearchOptions:
    """Knobs of one search run (RL uses episodes/batch/seed/state; others ignore them)."""

    policy: str = "rl"
    episodes: int = 300
    batch: int = 16
    seed: int = 0
    state_path: str | None = None
    checkpoint_every: int = 10
    measurer: Measurer | None = None
    measure_every: int = 50
    progress: bool = False
    on_episode: object = None


@dataclass
class SearchResult:
    plan: BitPlan
    assign: np.ndarray
    cost: CostBreakdown
    visited: list[dict] = field(default_factory=list)
    measured: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    evaluations: int = 0


def run_search(problem: SearchProblem, config: CostConfig, estimator: Estimator,
               options: SearchOptions) -> SearchResult:
    """Run ``options.policy`` on ``problem`` and return the best plan it finds (validated to fit the budget)."""
    problem.check_budget()
    policy = get_policy(options.policy)
    if problem.drops and policy.name != "ilp":
        raise MoecError(f"--knobs drop is searched by the ilp policy only (it keeps top-k experts per layer as a "
                        f"constraint); the {policy.name} policy does not; use --policy ilp")
    if options.measurer is not None and not isinstance(estimator, CorrectedEstimator):
        estimator = CorrectedEstimator(estimator)
    cost = CostFunction(problem, config, estimator)
    ctx = SearchContext(problem, cost, options.seed, options.episodes, options.batch, options.measurer,
                        max(options.measure_every, 1), options.state_path, max(options.checkpoint_every, 1),
                        options.progress, options.on_episode)
    t0 = time.time()
    assign = policy.run(ctx)
    final = ctx.evaluate(assign, policy.name)
    if options.measurer is not None:
        ctx.measure(assign)
    if not final.feasible:  # only reachable through a tampered or foreign search state
        raise MoecError(f"the {policy.name} search ended with a plan over the budget ({final.memory_bytes / 1e6:.3f} MB "
                        f"> {problem.budget_bytes / 1e6:.3f} MB); if it resumed from a search state, delete that file")
    visited = [{"assign": list(k), **v} for k, v in ctx.visited.items()]
    measured = [{"assign": list(k), **v} for k, v in ctx.measured.items()]
    prov = {"policy": policy.name, "alpha": config.alpha, "beta": config.beta, "gamma": config.gamma,
            "weighting": config.weighting, "budget_mb": problem.budget_bytes / 1e6,
            "memory_mb": final.memory_bytes / 1e6, "cost": final.total, "accuracy_loss": final.accuracy,
            "loss_source": problem.loss_source, "latency_ms": final.latency_s * 1e3, "energy_mj": final.energy_j * 1e3,
            "latency_source": final.label, "device_measurements": len(measured), "seed": options.seed,
            "episodes": options.episodes if policy.iterative else 0}
    if options.measurer is not None and tuple(int(a) for a in assign) in ctx.measured:
        m = ctx.measured[tuple(int(a) for a in assign)]
        prov["measured_latency_ms"] = m["latency_s"] * 1e3
        if m["energy_j"] is not None:
            prov["measured_energy_mj"] = m["energy_j"] * 1e3
    plan = problem.to_plan(assign, prov)
    return SearchResult(plan, assign, final, visited, measured, time.time() - t0, cost.evaluations)
