"""ILP policy: the exact optimum of the additive cost under the memory budget (scipy ``milp``).

Binary ``x[i, j]`` = expert ``i`` at ``bits[j]``; one choice per expert; Σ bytes·x <= budget.
The objective is the cost's additive form (:meth:`CostFunction.additive`): exact when the
estimator is additive (no per-bit-class launch overhead), otherwise a stand-in whose plan
is then scored with the true cost.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_matrix

from moec.core.errors import MoecError
from moec.search.policies.base import SearchContext

log = logging.getLogger("moec")


def solve_additive(coef: np.ndarray, nbytes: np.ndarray, capacity: int,
                   groups: list[tuple[np.ndarray, int]] = ()) -> np.ndarray:
    """argmin Σ coef[i, a_i] s.t. Σ nbytes[i, a_i] <= capacity (exact, by mixed-integer programming).

    ``groups``: ``(rows, limit)`` pairs: at most ``limit`` of those rows may take column 0 (dropped experts
    of one layer)."""
    n, m = coef.shape
    rows = np.repeat(np.arange(n), m)
    one_each = csr_matrix((np.ones(n * m), (rows, np.arange(n * m))), shape=(n, n * m))
    cons = [LinearConstraint(one_each, 1, 1),
            LinearConstraint(nbytes.reshape(1, -1).astype(float), -np.inf, float(capacity))]
    if groups:
        drop = np.zeros((len(groups), n * m))
        for g, (members, _) in enumerate(groups):
            drop[g, np.asarray(members) * m] = 1.0
        cons.append(LinearConstraint(drop, -np.inf, np.array([float(limit) for _, limit in groups])))
    res = milp(coef.ravel(), constraints=cons, integrality=np.ones(n * m), bounds=Bounds(0, 1),
               options={"mip_rel_gap": 0.0})
    if res.status != 0 or res.x is None:
        raise MoecError(f"the integer program found no plan within the budget ({res.message})")
    return np.round(res.x).reshape(n, m).argmax(axis=1).astype(np.int64)


class ILPPolicy:
    name = "ilp"
    iterative = False

    def run(self, ctx: SearchContext) -> np.ndarray:
        p = ctx.problem
        coef, _, exact = ctx.cost.additive()
        if not exact:
            log.info("ilp: latency is not additive under this estimator; solving its additive stand-in")
        groups = [(np.flatnonzero(p.layer_index == k), p.max_drops(l)) for k, l in enumerate(p.layers)] if p.drops else []
        a = solve_additive(coef, p.nbytes, p.budget_bytes - p.fixed_bytes, groups)
        ctx.evaluate(a, self.name)
        return a
