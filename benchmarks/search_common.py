"""Shared helpers of the search benchmarks: load the reference model's profile, evaluate plans, model their cost."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from moec import api
from moec.core.targets import load_target
from moec.models.checkpoint import load_checkpoint
from moec.profile.stats import ExpertStats
from moec.quant.accounting import plan_memory
from moec.search.estimator import AnalyticEstimator
from moec.core.plan import BitPlan
from moec.search.problem import build_problem

REPO = Path(__file__).resolve().parents[1]
CKPT = REPO / "reference" / "checkpoint"
CALIB = REPO / "reference" / "data" / "calib.txt"
HELDOUT = REPO / "reference" / "data" / "heldout.txt"


def ensure_profile(path: Path, max_tokens: int = 16384, exact_tokens: int = 8192) -> Path:
    """The reference profile with proxy + exact sensitivity (exact on calibration text, never held-out)."""
    if not path.is_file():
        api.profile(CKPT, api.DataConfig(CALIB, 256, max_tokens, 8), out=path,
                    sensitivity=api.SensitivityConfig("both", (2, 3, 4, 8), 64, "rtn",
                                                      api.DataConfig(CALIB, 256, exact_tokens, 8)))
    return path


@dataclass
class Row:
    name: str
    top1: float
    ppl: float
    mb: float
    latency_ms: float | None = None
    energy_mj: float | None = None
    measured_ms: float | None = None
    plan: BitPlan | None = None


class Bench:
    """The reference model, its profile, the target and a held-out evaluator."""

    def __init__(self, profile: Path, target: str = "host", heldout_tokens: int = 16384) -> None:
        self.model = load_checkpoint(CKPT)
        self.stats = ExpertStats.load(profile)
        self.preset = load_target(target)
        self.estimator = AnalyticEstimator.for_target(self.preset)
        self.norms = plan_memory(self.model, BitPlan({}, {}, 64)).kind_total("norms/bias")
        self.heldout = api.DataConfig(HELDOUT, 256, heldout_tokens, 8)
        self.tmp = tempfile.TemporaryDirectory(prefix="moec-bench-")

    def evaluate(self, name: str, plan: BitPlan | str | None) -> Row:
        spec = plan
        if isinstance(plan, BitPlan):
            spec = Path(self.tmp.name) / f"{name.replace(' ', '_').replace('/', '_')}.json"
            plan.save(spec)
        ev = api.evaluate(CKPT, self.heldout, plan=spec, progress=False)
        mb = (ev.memory.total if ev.memory else ev.float32_bytes) / 1e6
        row = Row(name, ev.result.top1, ev.result.perplexity, mb, plan=ev.plan)
        if ev.plan is not None:
            row.latency_ms, row.energy_mj = self.modelled(ev.plan)
        return row

    def modelled(self, plan: BitPlan) -> tuple[float, float]:
        """Modelled ms and mJ per decode step of any plan (its own non-expert bits)."""
        bits = sorted({b for l in plan.experts.values() for b in l.values()} | {16})
        allowed = sorted(set(bits) | set(self.preset.allowed_bits))
        prob = build_problem(self.model.cfg, self.stats, 1e9, allowed, self.norms, plan.tensors, plan.group_size,
                             plan.method)
        est = self.estimator.estimate(prob, prob.from_plan(plan))
        return est.latency_s * 1e3, est.energy_j * 1e3

    def measure(self, plan: BitPlan | str, steps: int = 64, repeats: int = 5) -> float:
        """Measured ms per decode step of a host bundle of ``plan``."""
        from moec.search.measure import time_decode

        out = Path(self.tmp.name) / f"bundle-{abs(hash(str(plan if isinstance(plan, str) else plan.to_json())))}"
        api.compile_bundle(api.CompileConfig(CKPT, out, self.preset.name, plan=plan,
                                             method="rtn" if isinstance(plan, str) else plan.method))
        return time_decode(out, steps, repeats)[0] * 1e3


def markdown(rows: list[Row], fp32: Row, int8: Row) -> str:
    head = ("| plan | top-1 | Δ top-1 vs FP32 | perplexity | weight MB | vs INT8 MB | latency ms/step (modelled) "
            "| energy mJ/step (modelled) | decode ms/step (measured) |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        def f(v, fmt):
            return "–" if v is None else format(v, fmt)
        lines.append(f"| {r.name} | {r.top1:.4f} | {(r.top1 - fp32.top1) * 100:+.2f} pt | {r.ppl:.3f} | {r.mb:.3f} "
                     f"| {(r.mb / int8.mb - 1) * 100:+.1f} % | {f(r.latency_ms, '.4f')} | {f(r.energy_mj, '.4f')} "
                     f"| {f(r.measured_ms, '.3f')} |")
    return "\n".join(lines)
