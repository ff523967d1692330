"""Recipes: strict YAML (pydantic, unknown keys named) capturing model, data, budget, α/β/γ, weighting, policy, target.

Relative paths in a recipe are relative to the recipe file. Command-line flags override
recipe fields; the resolved recipe (after overrides) is written into the bundle manifest.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from moec.core.errors import MoecError
from moec.core.targets import load_target
from moec.pipeline.compile import CompileConfig
from moec.pipeline.profile import DataConfig
from moec.pipeline.search import SearchConfig
from moec.search.cost import DEFAULT_WEIGHTING, WEIGHTINGS
from moec.search.policies import POLICIES
from moec.search.problem import DEFAULT_TENSORS


class DataSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    calibration: str
    max_tokens: int | None = Field(default=16384, gt=0)
    seq_len: int = Field(default=256, gt=1)
    batch: int = Field(default=8, gt=0)


class Recipe(BaseModel):
    """One end-to-end compile: what to compile, for which target, under which budget and search."""

    model_config = ConfigDict(extra="forbid")
    name: str = ""
    description: str = ""
    model: str
    data: DataSpec | None = None
    profile: str | None = None
    target: str = "host"
    budget_mb: float | None = Field(default=None, gt=0)
    policy: str = "rl"
    alpha: float = Field(default=1.0, ge=0)
    beta: float = Field(default=0.5, ge=0)
    gamma: float = Field(default=0.05, ge=0)
    weighting: str = DEFAULT_WEIGHTING
    sensitivity: str = "auto"
    tensor_bits: dict[str, int] = Field(default_factory=lambda: dict(DEFAULT_TENSORS))
    group_size: int = Field(default=64, gt=0)
    method: str = "rtn"
    episodes: int = Field(default=300, gt=0)
    seed: int = 0

    @field_validator("policy")
    @classmethod
    def _policy(cls, v: str) -> str:
        return _choice(v, POLICIES, "policy")

    @field_validator("weighting")
    @classmethod
    def _weighting(cls, v: str) -> str:
        return _choice(v, WEIGHTINGS, "weighting")

    @field_validator("sensitivity")
    @classmethod
    def _sensitivity(cls, v: str) -> str:
        return _choice(v, ("auto", "exact", "proxy"), "sensitivity source")


def _choice(value: str, choices, what: str) -> str:
    """``value`` if it is one of ``choices``, else a ValueError that lists them."""
    if value not in choices:
        raise ValueError(f"unknown {what} '{value}'; choices: {', '.join(choices)}")
    return value


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and validate a recipe; relative paths become paths relative to the recipe's directory."""
    p = Path(path)
    if not p.is_file():
        raise MoecError(f"recipe '{p}' does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise MoecError(f"recipe '{p}' is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise MoecError(f"recipe '{p}' must be a YAML mapping")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        err = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")[0]  # typos first
        where = ".".join(str(x) for x in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            raise MoecError(f"recipe '{p}': unknown key '{where}'") from None
        raise MoecError(f"recipe '{p}': field '{where}': {err['msg']}") from None
    base = p.resolve().parent

    def rel(s: str | None) -> str | None:
        return None if s is None else str(base / s) if not Path(s).is_absolute() else s

    recipe.model = rel(recipe.model)
    recipe.profile = rel(recipe.profile)
    if recipe.data is not None:
        recipe.data.calibration = rel(recipe.data.calibration)
    if recipe.target.endswith((".yaml", ".yml")) or os.sep in recipe.target:
        recipe.target = rel(recipe.target)
    return recipe


def check_target(recipe: Recipe) -> None:
    """Resolve the recipe's target preset now (unknown names fail listing the choices)."""
    load_target(recipe.target)


def resolve(recipe: Recipe | None, overrides: dict) -> Recipe:
    """The recipe with every non-None override applied (validated again), or one built from overrides alone."""
    base = recipe.model_dump(exclude_unset=True) if recipe is not None else {}
    data_over = {k: overrides.pop(k) for k in ("calibration", "max_tokens") if k in overrides}
    base.update({k: v for k, v in overrides.items() if v is not None})
    if data_over.get("calibration") is not None:
        base["data"] = {**(base.get("data") or {}), "calibration": data_over["calibration"]}
    if data_over.get("max_tokens") is not None and base.get("data"):
        base["data"]["max_tokens"] = data_over["max_tokens"]
    if "model" not in base:
        raise MoecError("no model: give CHECKPOINT or a recipe with 'model'")
    try:
        return Recipe.model_validate(base)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise MoecError(f"option '{'.'.join(str(x) for x in err['loc'])}': {err['msg']}") from None


def compile_config(recipe: Recipe, out: str | os.PathLike, plan=None, debug_dump=None, progress: bool = True):
    """The ``CompileConfig`` (with its search settings) a resolved recipe describes."""
    data = None
    if recipe.data is not None:
        data = DataConfig(recipe.data.calibration, recipe.data.seq_len, recipe.data.max_tokens, recipe.data.batch)
    scfg = SearchConfig(recipe.model, recipe.target, recipe.budget_mb, recipe.profile, data, recipe.policy,
                        recipe.alpha, recipe.beta, recipe.gamma, recipe.weighting, recipe.sensitivity,
                        dict(recipe.tensor_bits), recipe.group_size, recipe.method, recipe.episodes, seed=recipe.seed,
                        progress=progress)
    # uniform:B plans keep compile's historical default quantizer (mse) unless the method is given
    method = recipe.method if "method" in recipe.model_fields_set or plan is None else "mse"
    return CompileConfig(recipe.model, out, recipe.target, plan, data, recipe.group_size, method,
                         debug_dump, search=scfg, recipe=recipe.model_dump())
