"""The search stage from files: checkpoint + profile (or calibration text) + target → searched BitPlan (+ plots)."""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from moec.core.errors import MoecError
from moec.core.formats import DROPPED_BITS
from moec.core.plan import BitPlan, uniform_plan
from moec.core.targets import load_target
from moec.models.lazy import LazyCheckpoint
from moec.models.model import MoEModel
from moec.pipeline.profile import DataConfig, SensitivityConfig, profile
from moec.profile.stats import ExpertStats
from moec.quant.accounting import plan_memory, shape_model
from moec.search.cost import DEFAULT_WEIGHTING, CostConfig
from moec.search.driver import SearchOptions, SearchResult, run_search
from moec.search.estimator import AnalyticEstimator, SimulatorEstimator
from moec.search.measure import FarmMeasurer, LocalBundleMeasurer
from moec.search.plot import bits_frequency_plot, pareto_plot
from moec.search.problem import DEFAULT_TENSORS, SearchProblem, build_problem

log = logging.getLogger("moec")

ESTIMATORS = ("analytic", "simulator")
MEASURES = ("none", "local", "farm")
#: Budget when none is given: this fraction of the uniform INT8 plan's weight memory.
DEFAULT_BUDGET_FRACTION = 0.6


@dataclass
class SearchConfig:
    """Inputs of ``moec search`` (see the CLI help for each field)."""

    checkpoint: str | os.PathLike
    target: str = "host"
    budget_mb: float | None = None
    profile: str | os.PathLike | None = None
    data: DataConfig | None = None               # profile here when no profile file
    policy: str = "rl"
    alpha: float = 1.0
    beta: float = 0.5
    gamma: float = 0.05
    weighting: str = DEFAULT_WEIGHTING
    sensitivity: str = "auto"
    tensor_bits: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_TENSORS))
    group_size: int = 64
    method: str = "rtn"
    episodes: int = 300
    batch: int = 16
    seed: int = 0
    state: str | os.PathLike | None = None
    plot_dir: str | os.PathLike | None = None
    estimator: str = "analytic"
    simulator: str | os.PathLike | None = None
    measure: str = "none"
    measure_every: int = 50
    tracker: str | None = None
    progress: bool = True
    #: Architecture knobs the search also chooses (``SEARCH_KNOBS``): ``("drop",)`` lets it drop experts.
    knobs: tuple[str, ...] = ()


@dataclass
class SearchOutcome:
    result: SearchResult
    problem: SearchProblem
    plots: list[Path] = field(default_factory=list)


def _stats(cfg: SearchConfig, allowed: list[int], model: MoEModel | None) -> ExpertStats:
    if cfg.profile is not None:
        return ExpertStats.load(cfg.profile)
    if cfg.data is None:
        raise MoecError("search needs a profile with sensitivity (--profile) or calibration text (--data)")
    log.info("no profile given: profiling routing and proxy sensitivity on '%s'", cfg.data.path)
    bits = tuple(b for b in allowed if b != 16)
    if "drop" in cfg.knobs:
        bits = (DROPPED_BITS, *bits)
    return profile(cfg.checkpoint, cfg.data, progress=cfg.progress, model=model,
                   sensitivity=SensitivityConfig("proxy", bits, cfg.group_size, cfg.method))


def _estimator(cfg: SearchConfig, preset, model_cfg):
    analytic = AnalyticEstimator.for_target(preset)
    if cfg.estimator == "analytic":
        return analytic
    if cfg.estimator == "simulator":
        if cfg.simulator is None:
            raise MoecError("--estimator simulator needs --simulator PATH (a calibrated simulator file)")
        return SimulatorEstimator.load(cfg.simulator, model_cfg, analytic)
    raise MoecError(f"unknown estimator '{cfg.estimator}'; choices: {', '.join(ESTIMATORS)}")


def _measurer(cfg: SearchConfig, workdir: Path | None):
    if cfg.measure == "none":
        return None
    if cfg.measure == "local":
        return LocalBundleMeasurer(cfg.checkpoint, cfg.target, workdir / "bundles" if workdir else None)
    if cfg.measure == "farm":
        if not cfg.tracker:  # before making the work folder: a refused run leaves nothing behind
            raise MoecError("--measure farm needs --tracker HOST:PORT")
        workdir = workdir or Path(tempfile.mkdtemp(prefix="moec-farm-"))
        return FarmMeasurer(cfg.checkpoint, cfg.target, cfg.tracker, workdir / "measurements.db", workdir / "bundles")
    raise MoecError(f"unknown measure mode '{cfg.measure}'; choices: {', '.join(MEASURES)}")


def uniform_memory_mb(model, bits: int, group_size: int = 64) -> float:
    return plan_memory(model, uniform_plan(model.cfg, bits, group_size)).total / 1e6


def search(cfg: SearchConfig, model: MoEModel | None = None) -> SearchOutcome:
    """Build the problem, run the policy, write plots; the plan is returned, not saved.

    ``model``, if given, is ``cfg.checkpoint`` already loaded (it is not modified).
    """
    preset = load_target(cfg.target)
    cost_cfg = CostConfig(cfg.alpha, cfg.beta, cfg.gamma, cfg.weighting)  # validate before the slow parts
    if cfg.budget_mb is not None and cfg.budget_mb <= 0:
        raise MoecError(f"--budget-mb must be positive (got {cfg.budget_mb})")
    # accounting needs shapes only: without a loaded model, the search never reads weights
    shapes = model if model is not None else shape_model(LazyCheckpoint(cfg.checkpoint).cfg)
    # every candidate quantizes every weight: the group size must divide them all (search does not pad)
    uniform_plan(shapes.cfg, 4, cfg.group_size, cfg.method).validate(shapes.cfg)
    stats = _stats(cfg, preset.allowed_bits, model)  # profiling (no --profile) loads what it needs
    model = shapes
    norms = plan_memory(model, BitPlan({}, {}, cfg.group_size)).kind_total("norms/bias")
    budget = cfg.budget_mb if cfg.budget_mb is not None else \
        DEFAULT_BUDGET_FRACTION * uniform_memory_mb(model, 8, cfg.group_size)
    problem = build_problem(model.cfg, stats, budget, preset.allowed_bits, norms, cfg.tensor_bits, cfg.group_size,
                            cfg.method, cfg.sensitivity, tuple(cfg.knobs))
    if problem.drops and cfg.estimator != "analytic":
        raise MoecError("--knobs drop works with the analytic estimator; the simulator has no latency for a "
                        "dropped expert")
    estimator = _estimator(cfg, preset, model.cfg)
    workdir = Path(cfg.state).with_suffix(".d") if cfg.state else None  # measured bundles live beside the state
    opts = SearchOptions(cfg.policy, cfg.episodes, cfg.batch, cfg.seed, str(cfg.state) if cfg.state else None,
                         measurer=_measurer(cfg, workdir), measure_every=cfg.measure_every, progress=cfg.progress)
    result = run_search(problem, cost_cfg, estimator, opts)
    result.plan.provenance.update({"target": preset.name, "checkpoint": str(cfg.checkpoint),
                                   "profile": str(cfg.profile) if cfg.profile else None})
    result.plan.validate(model.cfg, tuple(preset.allowed_bits))
    assert plan_memory(model, result.plan).total == result.cost.memory_bytes, "memory accounting disagrees"
    plots = []
    if cfg.plot_dir is not None:
        d = Path(cfg.plot_dir)
        plots.append(pareto_plot(result.visited, result.cost.to_json(), d / "pareto.png",
                                 f"{cfg.policy}: {len(result.visited)} plans visited"))
        plots.append(bits_frequency_plot(problem, result.assign, d / "bits_vs_frequency.png",
                                         f"{cfg.policy} plan, {result.cost.memory_bytes / 1e6:.2f} MB"))
    return SearchOutcome(result, problem, plots)
