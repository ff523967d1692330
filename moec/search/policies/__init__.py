"""Search policies, registered by name (explicit imports; errors list the choices)."""

from __future__ import annotations

from moec.core.errors import MoecError
from moec.search.policies.base import Policy
from moec.search.policies.greedy import GreedyPolicy
from moec.search.policies.ilp import ILPPolicy
from moec.search.policies.rl import RLPolicy
from moec.search.policies.uniform import UniformPolicy

POLICIES: dict[str, type] = {"uniform": UniformPolicy, "greedy": GreedyPolicy, "ilp": ILPPolicy, "rl": RLPolicy}


def get_policy(name: str) -> Policy:
    if name not in POLICIES:
        raise MoecError(f"unknown policy '{name}'; choices: {', '.join(POLICIES)}")
    return POLICIES[name]()
