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
    model_config = ConfigDict(extra="forbid", strict=True)
    calibration: str
    max_tokens: int | None = Field(default=16384, gt=0)
    seq_len: int = Field(default=256, gt=1)
    batch: int = Field(default=8, gt=0)


class Recipe(BaseModel):
    """One end-to-end compile: what to compile, for which target, under which budget and search."""

    model_config = ConfigDict(extra="forbid", strict=True)  # strict: "64" is not an int, no coercion
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

    @field_validator("tensor_bits")
    @classmethod
    def _tensor_keys(cls, v: dict[str, int]) -> dict[str, int]:
        import re
        for key in v:
            if key.startswith("re:"):
                try:
                    re.compile(key[3:])
                except (re.error, RecursionError, OverflowError) as exc:
                    raise ValueError(f"tensor key '{key[:60]}' is not a valid regex ({exc})") from None
        return v

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


MAX_RECIPE_BYTES = 1 << 20
MAX_RECIPE_DEPTH = 16


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and anchors/aliases (no silent overrides, no alias bombs)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                dup = key in seen
            except TypeError:
                raise yaml.constructor.ConstructorError(None, None, f"unhashable key {str(key)[:40]}",
                                                        key_node.start_mark) from None
            if dup:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{str(key)[:40]}'",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in recipes",
                                              event.start_mark)
        return super().compose_node(parent, index)


def _depth(obj) -> int:
    deepest, stack = 0, [(obj, 0)]
    while stack:
        o, d = stack.pop()
        deepest = max(deepest, d)
        if isinstance(o, dict):
            stack.extend((v, d + 1) for v in o.values())
        elif isinstance(o, list):
            stack.extend((v, d + 1) for v in o)
    return deepest


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and validate a recipe; relative paths become paths relative to the recipe's directory."""
    p = Path(path)
    if not p.is_file():
        raise MoecError(f"recipe '{p}' does not exist")
    raw = p.read_bytes()[:MAX_RECIPE_BYTES + 1]
    if len(raw) > MAX_RECIPE_BYTES:
        raise MoecError(f"recipe '{p}' is larger than {MAX_RECIPE_BYTES >> 10} KiB")
    try:
        data = yaml.load(raw.decode("utf-8"), Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except UnicodeDecodeError:
        raise MoecError(f"recipe '{p}' is not UTF-8 text") from None
    except yaml.YAMLError as exc:
        line = " ".join(str(exc).split())
        raise MoecError(f"recipe '{p}' is not valid YAML: {line[:200]}") from None
    except RecursionError:
        raise MoecError(f"recipe '{p}' is nested too deeply") from None
    except (ValueError, OverflowError) as exc:  # e.g. a 5000-digit integer
        raise MoecError(f"recipe '{p}' has a value moec cannot read: {str(exc)[:100]}") from None
    if _depth(data) > MAX_RECIPE_DEPTH:
        raise MoecError(f"recipe '{p}' is nested deeper than {MAX_RECIPE_DEPTH} levels")
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
    # uniform:B means the same quantizer everywhere (UNIFORM_METHOD) unless the method is given
    from moec.core.plan import UNIFORM_METHOD
    method = recipe.method if "method" in recipe.model_fields_set or plan is None else UNIFORM_METHOD
    return CompileConfig(recipe.model, out, recipe.target, plan, data, recipe.group_size, method,
                         debug_dump, search=scfg, recipe=recipe.model_dump())
