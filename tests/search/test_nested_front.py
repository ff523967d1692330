"""The plan front a nested bundle stores: the search's own Pareto plans over the nested widths."""

from __future__ import annotations

import numpy as np

from moec.core.config import MoEConfig
from moec.core.plan import uniform_plan
from moec.core.targets import load_target
from moec.search.nested_front import nested_front, searched_front_plans
from moec.search.policies.base import repair

from tests.search.problems import synthetic_problem


def _cost(problem, plan):
    cols = [problem.bits.index(plan.experts[l][e]) for l, e in problem.items]
    return problem.memory(np.array(cols)), float(problem.frequency @ problem.loss[np.arange(problem.n), cols])


def test_searched_front_is_the_greedy_search_pareto_set_over_nested_widths():
    problem = synthetic_problem(layers=2, experts=4, seed=1)
    plans = searched_front_plans(problem, 8, load_target("host"), rungs=6)
    widths = [sorted({b for row in p.experts.values() for b in row.values()}) for p in plans]
    assert widths[0] == [8] and widths[-1] == [2]  # the widest and the narrowest budgets
    assert all(set(w) <= {2, 3, 4, 8} for w in widths)  # never 16, never a width the storage lacks
    costs = [_cost(problem, p) for p in plans]
    mems, losses = [m for m, _ in costs], [a for _, a in costs]
    assert mems == sorted(mems, reverse=True) and len(set(mems)) == len(mems)
    assert losses == sorted(losses) and len(set(losses)) == len(losses)  # non-dominated: less memory, more loss
    assert len(plans) >= 3
    # each is what the greedy search returns at its own memory: the frequency x sensitivity order of repair()
    sub_cols = [problem.bits.index(b) for b in (2, 3, 4, 8)]
    for plan, mem in zip(plans, mems):
        sub = synthetic_problem(layers=2, experts=4, seed=1, bits=(2, 3, 4, 8))
        assert np.array_equal(sub.nbytes, problem.nbytes[:, sub_cols])
        sub.budget_bytes = mem
        greedy = repair(sub, sub.frequency[:, None] * sub.loss, np.full(sub.n, sub.m - 1))
        assert [plan.experts[l][e] for l, e in sub.items] == list(np.asarray(sub.bits)[greedy])


def test_nested_front_stores_the_searched_plans_with_their_cost():
    cfg = MoEConfig(vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, num_experts=4,
                    top_k=2, expert_intermediate=64)
    problem = synthetic_problem(layers=2, experts=4, seed=2)
    base = uniform_plan(cfg, 8, 64)
    preset = load_target("host")
    front = nested_front(cfg, base, 8, preset, problem=problem, rungs=5)
    plans = searched_front_plans(problem, 8, preset, rungs=5)
    assert [e["experts"] for e in front] == [{str(l): [p.experts[l][x] for x in range(4)] for l in cfg.moe_layers}
                                             for p in plans]
    assert [e["expert_bytes"] for e in front] == sorted((e["expert_bytes"] for e in front), reverse=True)
    ladder = nested_front(cfg, base, 8, preset, rungs=5)  # without a search problem: the memory ladder
    assert ladder[0]["mean_bits"] == 8 and ladder[-1]["mean_bits"] == 2

