"""Greedy policy: start at the highest bits, lower the expert with the smallest frequency × sensitivity
increase per byte saved, one step at a time, until the plan fits the budget."""

from __future__ import annotations

import numpy as np

from moec.search.policies.base import SearchContext, repair


class GreedyPolicy:
    name = "greedy"
    iterative = False

    def run(self, ctx: SearchContext) -> np.ndarray:
        p = ctx.problem
        # the classic ordering: activation frequency × sensitivity (not the configured cost)
        coef = p.frequency[:, None] * p.loss
        a = repair(p, coef, np.full(p.n, p.m - 1, dtype=np.int64))
        ctx.evaluate(a, self.name)
        return a
