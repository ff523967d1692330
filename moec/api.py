"""Typed entry points for every pipeline stage; the CLI only parses options and calls these."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from moec.errors import MoecError
from moec.models.checkpoint import load_checkpoint
from moec.models.model import MoEModel
from moec.models.tokenizer import load_tokenizer
from moec.profile.data import read_text, token_windows
from moec.profile.evaluate import EvalResult, evaluate_windows
from moec.profile.routing import collect_stats
from moec.profile.stats import ExpertStats
from moec.quant.accounting import MemoryReport, float32_memory, plan_memory
from moec.quant.packed_model import apply_plan
from moec.search.plan import BitPlan, resolve_plan

log = logging.getLogger("moec")


@dataclass
class DataConfig:
    """Which text to run and how to cut it."""

    path: str | os.PathLike
    seq_len: int = 256
    max_tokens: int | None = None
    batch: int = 8


def load_model_and_windows(checkpoint: str | os.PathLike, data: DataConfig) -> tuple[MoEModel, "object"]:
    text = read_text(data.path)  # check the cheap input first
    model = load_checkpoint(checkpoint)
    tok = load_tokenizer(checkpoint)
    return model, token_windows(tok, text, data.seq_len, data.max_tokens)


@dataclass
class SensitivityConfig:
    """Which sensitivity measurements ``profile`` adds (``kind``: none, proxy, exact or both)."""

    kind: str = "none"
    bits: tuple[int, ...] = (2, 3, 4, 8)
    group_size: int = 64
    method: str = "rtn"
    heldout: DataConfig | None = None


def profile(checkpoint: str | os.PathLike, data: DataConfig, out: str | os.PathLike | None = None,
            plot: str | os.PathLike | None = None, progress: bool = True,
            sensitivity: SensitivityConfig | None = None) -> ExpertStats:
    """Routing statistics of ``checkpoint`` on ``data`` (+ optional sensitivity), saved to ``out``/``plot``.

    Exact sensitivity runs on ``sensitivity.heldout`` (default: the calibration data).
    """
    sens = sensitivity or SensitivityConfig()
    if sens.kind not in ("none", "proxy", "exact", "both"):
        raise MoecError(f"unknown sensitivity kind '{sens.kind}'; choices: none, proxy, exact, both")
    model, windows = load_model_and_windows(checkpoint, data)
    stats = collect_stats(model, windows, batch=data.batch, progress=progress)
    stats.data_sha256 = hashlib.sha256(Path(data.path).read_bytes()).hexdigest()
    if sens.kind != "none":
        from moec.profile.sensitivity import Sensitivity, exact_sensitivity, proxy_sensitivity
        result = Sensitivity(list(sens.bits), sens.group_size, sens.method)
        if sens.kind in ("proxy", "both"):
            result.proxy = proxy_sensitivity(model, windows, result.bits, sens.group_size, sens.method,
                                             batch=data.batch, progress=progress)
        if sens.kind in ("exact", "both"):
            held = windows
            if sens.heldout is not None:
                held = token_windows(load_tokenizer(checkpoint), read_text(sens.heldout.path),
                                     sens.heldout.seq_len, sens.heldout.max_tokens)
            result.exact = exact_sensitivity(model, held, result.bits, sens.group_size, sens.method,
                                             progress=progress)
        stats.sensitivity = result.to_json()
    if out is not None:
        stats.save(out)
    if plot is not None:
        from moec.profile.plot import frequency_heatmap
        frequency_heatmap(stats, plot)
    return stats


@dataclass
class PlanEval:
    """Accuracy of a model under a plan, with the plan's exact memory."""

    result: EvalResult
    plan: BitPlan | None
    memory: MemoryReport | None
    float32_bytes: int


def evaluate(checkpoint: str | os.PathLike, data: DataConfig, plan: str | os.PathLike | None = None,
             progress: bool = True) -> PlanEval:
    """Perplexity and top-1 accuracy, under a bit plan (file or ``uniform:B``) if one is given.

    The plan is applied as fake quantization with the same quantizers every back end uses.
    """
    text = read_text(data.path)
    model = load_checkpoint(checkpoint)
    bit_plan = resolve_plan(plan, model.cfg) if plan is not None else None
    windows = token_windows(load_tokenizer(checkpoint), text, data.seq_len, data.max_tokens)
    fp32 = float32_memory(model)
    memory = None
    if bit_plan is not None:
        memory = plan_memory(model, bit_plan)
        apply_plan(model, bit_plan)
    res = evaluate_windows(model, windows, batch=data.batch, progress=progress)
    return PlanEval(res, bit_plan, memory, fp32)
