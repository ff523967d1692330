"""Accuracy of a compiled bundle: its own kernels' logits, scored like the torch model's (``moec eval BUNDLE``).

``moec eval CHECKPOINT --plan P`` measures the plan as fake quantization in torch: the weights a bundle
holds, but float32 arithmetic. A bundle can compute differently: ``--activations int8`` quantizes the
activations of its GEMVs to 8 bits per group, nested bundles serve derived widths, and every target has
its own kernels. This runs the bundle itself: each window teacher-forced through its decode step from
an empty cache (the step every generated token takes), the logits scored by
:func:`moec.profile.evaluate.target_scores` on the same windows as the torch evaluation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from moec.core.errors import MoecError
from moec.pipeline.profile import DataConfig
from moec.profile.data import file_windows
from moec.profile.evaluate import EvalResult, TokenScores, target_scores
from moec.runtime.session import BundleSession


@dataclass
class BundleEval:
    """Accuracy of a bundle on a text: the summary, per-token scores (for paired comparisons), what ran."""

    result: EvalResult
    scores: TokenScores
    activations: str          # the decode GEMVs' activations: float32 or int8
    plan: str | None          # a nested bundle's run-time plan, when one was served
    file_bytes: int           # every file of the bundle


def is_bundle(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a bundle directory (it holds ``manifest.json``), not a checkpoint."""
    return (Path(path) / "manifest.json").is_file()


def evaluate_bundle(bundle: str | os.PathLike, data: DataConfig, plan: str | None = None, progress: bool = True,
                    threads: int | None = None) -> BundleEval:
    """Perplexity and top-1 of ``bundle``'s decode logits on ``data`` (windows of ``data.seq_len`` tokens,
    every target scored; ``plan``: a nested bundle's run-time plan, JSON file or ``uniform:B``)."""
    data.check()
    if data.max_memory_gb is not None:
        raise MoecError("--max-memory-gb applies to checkpoints; a bundle is evaluated as it runs (memory-mapped)")
    with BundleSession(bundle, threads=threads) as session:
        if session.tokenizer is None:
            raise MoecError(f"bundle '{bundle}' has no tokenizer.json to tokenize {data.path}")
        if plan is not None:
            session.set_plan(plan)  # a fixed bundle refuses with one line; a nested one switches
        windows, _ = file_windows(session.tokenizer, data.path, data.seq_len, data.max_tokens,
                                  session.cfg["max_position"])
        session.reserve(data.seq_len)
        nll, correct = [], []
        for window in tqdm(windows.tolist(), desc="eval", unit="window", disable=not progress, leave=False):
            session.reset()
            logits = np.stack([np.array(session.step(t)) for t in window[:-1]])
            n, c = target_scores(torch.from_numpy(logits), torch.tensor(window[1:]))
            nll.append(n)
            correct.append(c)
        scores = TokenScores(torch.stack(nll), torch.stack(correct))
        acts = session.manifest.get("activations", "float32")
        size = sum(int(f["bytes"]) for f in session.manifest["files"].values())
    return BundleEval(scores.result(), scores, acts, None if plan is None else str(plan), size)

