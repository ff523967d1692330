"""Synthetic SearchProblems built in code (random but seeded) for policy tests."""

from __future__ import annotations

import numpy as np

from moec.search.problem import SearchProblem

BITS = (2, 3, 4, 8, 16)


def synthetic_problem(layers: int = 2, experts: int = 4, seed: int = 0, budget_frac: float = 0.5,
                      bits: tuple[int, ...] = BITS) -> SearchProblem:
    """Experts with bytes ∝ bits, sensitivities falling with bits, skewed routing frequencies."""
    rng = np.random.default_rng(seed)
    n = layers * experts
    items = [(l, e) for l in range(layers) for e in range(experts)]
    size = 3 * 64 * 64
    nbytes = np.array([[size * b // 8 + (0 if b == 16 else size // 32) for b in bits]] * n)
    freq = np.concatenate([rng.dirichlet(np.full(experts, 0.7)) * 2 for _ in range(layers)])
    scale = rng.lognormal(0, 1, n) * (0.2 + freq)
    loss = np.array([[s * 2.0 ** (-1.6 * b) * 16 if b < 16 else 0.0 for b in bits] for s in scale])
    lo, hi = nbytes[:, 0].sum(), nbytes[:, -1].sum()
    fixed = 10_000
    budget = int(fixed + lo + budget_frac * (hi - lo))
    return SearchProblem(items, bits, nbytes, loss, freq, rng.random(n), fixed, budget, 3 * 64 * 64,
                         fixed // 2, 20_000, group_size=64, model_fingerprint="synthetic")
