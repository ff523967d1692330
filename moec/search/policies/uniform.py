"""Uniform policy: the highest single bit-width for every expert that fits the budget."""

from __future__ import annotations

import numpy as np

from moec.core.errors import MoecError
from moec.search.policies.base import SearchContext


class UniformPolicy:
    name = "uniform"
    iterative = False

    def run(self, ctx: SearchContext) -> np.ndarray:
        p = ctx.problem
        for j in reversed(range(p.m)):
            a = np.full(p.n, j, dtype=np.int64)
            if p.feasible(a):
                ctx.evaluate(a, self.name)
                return a
        raise MoecError(f"no uniform plan fits {p.budget_bytes / 1e6:.3f} MB (smallest: "
                        f"{p.memory(np.zeros(p.n, dtype=np.int64)) / 1e6:.3f} MB at {p.bits[0]} bits)")
