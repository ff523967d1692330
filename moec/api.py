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


def profile(checkpoint: str | os.PathLike, data: DataConfig, out: str | os.PathLike | None = None,
            plot: str | os.PathLike | None = None, progress: bool = True) -> ExpertStats:
    """Routing statistics of ``checkpoint`` on ``data``; saved to ``out`` (JSON) and ``plot`` (PNG)."""
    model, windows = load_model_and_windows(checkpoint, data)
    stats = collect_stats(model, windows, batch=data.batch, progress=progress)
    stats.data_sha256 = hashlib.sha256(Path(data.path).read_bytes()).hexdigest()
    if out is not None:
        stats.save(out)
    if plot is not None:
        from moec.profile.plot import frequency_heatmap
        frequency_heatmap(stats, plot)
    return stats


def evaluate(checkpoint: str | os.PathLike, data: DataConfig, plan: str | os.PathLike | None = None,
             progress: bool = True) -> EvalResult:
    """Perplexity and next-token top-1 accuracy, optionally under a bit plan (fake quantization)."""
    model, windows = load_model_and_windows(checkpoint, data)
    if plan is not None:
        raise MoecError("--plan needs the quantization core, which is not available yet")
    return evaluate_windows(model, windows, batch=data.batch, progress=progress)
