"""The profile and eval stages from files: checkpoint + text → routing statistics (+ sensitivity) or accuracy."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from moec.artifact.bundle import sha256_file
from moec.core.errors import MoecError
from moec.core.formats import DEFAULT_ALLOWED, DROPPED_BITS, FLOAT_BITS
from moec.core.plan import UNIFORM_METHOD, BitPlan, resolve_plan
from moec.models.checkpoint import load_checkpoint
from moec.models.lazy import LazyCheckpoint
from moec.models.learned_quant import LEARNED_QUANT_FILE
from moec.models.memory_budget import MemoryPlan, memory_plan
from moec.models.model import MoEModel
from moec.models.tokenizer import load_tokenizer
from moec.profile.data import check_data_file, file_windows
from moec.profile.evaluate import EvalResult, evaluate_windows
from moec.profile.plot import frequency_heatmap
from moec.profile.routing import collect_stats
from moec.profile.sensitivity import Sensitivity, exact_sensitivity, proxy_sensitivity
from moec.profile.sequential import evaluate_sequential, profile_sequential
from moec.profile.stats import ExpertStats
from moec.quant.accounting import MemoryReport, float32_memory, plan_memory, shape_model
from moec.quant.packed_model import fake_quantize_model
from moec.quant.padding import pad_for_groups


@dataclass
class DataConfig:
    """Which text to run and how to cut it."""

    path: str | os.PathLike
    seq_len: int = 256
    max_tokens: int | None = None
    batch: int = 8
    max_memory_gb: float | None = None   # host-memory budget: above it, run layer by layer (or fail early)

    def check(self) -> None:
        """The cheap checks of the data file (exists, readable, not a directory) before a slow model load."""
        check_data_file(self.path, self.max_tokens)

    def windows_and_digest(self, checkpoint: str | os.PathLike, max_position: int) -> tuple["object", str]:
        """(token windows, sha256) of the text with ``checkpoint``'s tokenizer, streamed and stopped at
        ``max_tokens``; windows never exceed ``max_position``. The sha256 is of the whole file for a
        regular file, of the bytes read for a stream."""
        windows, digest = file_windows(load_tokenizer(checkpoint), self.path, self.seq_len, self.max_tokens,
                                       max_position)
        if Path(self.path).is_file():
            digest = sha256_file(self.path)
        return windows, digest

    def windows(self, checkpoint: str | os.PathLike, max_position: int):
        """The token windows of :meth:`windows_and_digest`."""
        return self.windows_and_digest(checkpoint, max_position)[0]


def memory_plan_of(checkpoint: str | os.PathLike, max_memory_gb: float | None,
                   stage: str) -> tuple[LazyCheckpoint, MemoryPlan]:
    """(lazy checkpoint with every header checked, how ``stage`` fits ``max_memory_gb``): whole model
    or one decoder layer at a time; a one-line error when not even one layer fits."""
    ckpt = LazyCheckpoint(checkpoint)
    mem = memory_plan(ckpt, max_memory_gb, stage)
    if mem.sequential and (Path(checkpoint) / LEARNED_QUANT_FILE).is_file():
        raise MoecError(f"'{checkpoint}' carries learned quantization parameters ({LEARNED_QUANT_FILE}), which the "
                        f"layer-by-layer {stage} does not use yet; raise --max-memory-gb to load it whole")
    return ckpt, mem


def load_model_and_windows(checkpoint: str | os.PathLike, data: DataConfig) -> tuple[MoEModel, "object"]:
    data.check()  # the cheap input first
    model = load_checkpoint(checkpoint)
    return model, data.windows(checkpoint, model.cfg.max_position)


@dataclass
class SensitivityConfig:
    """Which sensitivity measurements ``profile`` adds (``kind``: none, proxy, exact or both)."""

    kind: str = "none"
    bits: tuple[int, ...] = tuple(b for b in DEFAULT_ALLOWED if b != FLOAT_BITS)
    group_size: int = 64
    method: str = "rtn"
    heldout: DataConfig | None = None


def profile(checkpoint: str | os.PathLike, data: DataConfig, out: str | os.PathLike | None = None,
            plot: str | os.PathLike | None = None, progress: bool = True,
            sensitivity: SensitivityConfig | None = None, model: MoEModel | None = None) -> ExpertStats:
    """Routing statistics of ``checkpoint`` on ``data`` (+ optional sensitivity), saved to ``out``/``plot``.

    Exact sensitivity runs on ``sensitivity.heldout`` (default: the calibration data). ``model``,
    if given, is ``checkpoint`` already loaded (it is not modified).
    """
    sens = sensitivity or SensitivityConfig()
    if sens.kind not in ("none", "proxy", "exact", "both"):
        raise MoecError(f"unknown sensitivity kind '{sens.kind}'; choices: none, proxy, exact, both")
    if model is None:
        data.check()  # the cheap input first
        ckpt, mem = memory_plan_of(checkpoint, data.max_memory_gb, "profile")
        _check_drop(ckpt.cfg, sens)
        if mem.sequential:
            stats = _profile_sequential(ckpt, checkpoint, data, sens, mem.hidden_budget, progress)
            return _save(stats, out, plot)
        model = load_checkpoint(checkpoint)
    _check_drop(model.cfg, sens)
    windows, digest = data.windows_and_digest(checkpoint, model.cfg.max_position)
    stats = collect_stats(model, windows, batch=data.batch, progress=progress)
    stats.data_sha256 = digest
    if sens.kind != "none":
        result = Sensitivity(list(sens.bits), sens.group_size, sens.method)
        if sens.kind in ("proxy", "both"):
            result.proxy = proxy_sensitivity(model, windows, result.bits, sens.group_size, sens.method,
                                             batch=data.batch, progress=progress)
        if sens.kind in ("exact", "both"):
            held = windows if sens.heldout is None else sens.heldout.windows(checkpoint, model.cfg.max_position)
            result.exact = exact_sensitivity(model, held, result.bits, sens.group_size, sens.method,
                                             progress=progress)
        stats.sensitivity = result.to_json()
    return _save(stats, out, plot)


def _check_drop(cfg, sens: SensitivityConfig) -> None:
    """Width 0 (drop the expert) only where plans may drop experts (plain top-k routers)."""
    if sens.kind != "none" and DROPPED_BITS in sens.bits and (cfg.router_bias or cfg.kept_groups < cfg.expert_groups):
        raise MoecError("sensitivity width 0 measures dropping an expert, which is implemented only for plain top-k "
                        "routers (no choice bias, no group-limited routing); remove 0 from --bits")


def _save(stats: ExpertStats, out, plot) -> ExpertStats:
    if out is not None:
        stats.save(out)
    if plot is not None:
        frequency_heatmap(stats, plot)
    return stats


def _profile_sequential(ckpt: LazyCheckpoint, checkpoint, data: DataConfig, sens: SensitivityConfig,
                        hidden_budget: int, progress: bool) -> ExpertStats:
    """``profile`` one decoder layer at a time; the exact sensitivity takes its layer-local form
    (relative squared change of that layer's MoE output on held-out tokens, only that expert quantized)."""
    windows, digest = data.windows_and_digest(checkpoint, ckpt.cfg.max_position)
    proxy = (tuple(sens.bits), sens.group_size, sens.method) if sens.kind in ("proxy", "both") else None
    stats, proxies = profile_sequential(ckpt, windows, data.batch, proxy, hidden_budget, progress)
    stats.data_sha256 = digest
    if sens.kind != "none":
        result = Sensitivity(list(sens.bits), sens.group_size, sens.method, proxy=proxies)
        if sens.kind in ("exact", "both"):
            held = windows if sens.heldout is None else sens.heldout.windows(checkpoint, ckpt.cfg.max_position)
            _, result.exact = profile_sequential(ckpt, held, data.batch, (tuple(sens.bits), sens.group_size,
                                                                          sens.method),
                                                 hidden_budget, progress, record=False)
        stats.sensitivity = {**result.to_json(), "exact_form": "layer-local" if result.exact else None}
    return stats


@dataclass
class PlanEval:
    """Accuracy of a model under a plan, with the plan's exact memory."""

    result: EvalResult
    plan: BitPlan | None
    memory: MemoryReport | None
    float32_bytes: int


def evaluate(checkpoint: str | os.PathLike, data: DataConfig, plan: str | os.PathLike | None = None,
             progress: bool = True, group_size: int = 64, method: str | None = None,
             scales: str | None = None) -> PlanEval:
    """Perplexity and top-1 accuracy, under a bit plan (file or ``uniform:B``) if one is given.

    The plan is applied as fake quantization with the same quantizers every back end uses.
    """
    data.check()
    ckpt, mem = memory_plan_of(checkpoint, data.max_memory_gb, "eval")
    if mem.sequential:
        shapes = shape_model(ckpt.cfg)
        bit_plan = (resolve_plan(plan, ckpt.cfg, group_size, method or UNIFORM_METHOD, scales=scales)
                    if plan is not None else None)
        windows = data.windows(checkpoint, ckpt.cfg.max_position)
        res = evaluate_sequential(ckpt, windows, bit_plan, data.batch, mem.hidden_budget, progress)
        return PlanEval(res, bit_plan, plan_memory(shapes, bit_plan) if bit_plan else None, float32_memory(shapes))
    model = load_checkpoint(checkpoint)
    bit_plan = (resolve_plan(plan, model.cfg, group_size, method or UNIFORM_METHOD, pad_ok=True, scales=scales)
                if plan is not None else None)
    windows = data.windows(checkpoint, model.cfg.max_position)
    fp32 = float32_memory(model)
    memory = None
    if bit_plan is not None:
        model, bit_plan = pad_for_groups(model, bit_plan)
        memory = plan_memory(model, bit_plan)
        fake_quantize_model(model, bit_plan)
    res = evaluate_windows(model, windows, batch=data.batch, progress=progress)
    return PlanEval(res, bit_plan, memory, fp32)
