"""Perplexity and next-token top-1 accuracy of a model on token windows (moec's accuracy metric)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from moec.core.errors import MoecError
from moec.models.model import MoEModel


@dataclass
class EvalResult:
    perplexity: float
    top1: float
    nll: float
    tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def _check_score_from(t: int, score_from) -> None:
    if isinstance(score_from, bool) or not isinstance(score_from, int) or not 0 <= score_from < t - 1:
        raise MoecError(f"score_from must be an integer in [0, {t - 2}] for windows of {t} tokens, "
                        f"got {score_from!r}")


def _scored_batches(model: MoEModel, windows: torch.Tensor, batch: int, progress: bool, score_from: int):
    """(logits, targets) of each batch of ``windows``, positions ``>= score_from`` only."""
    _check_score_from(windows.shape[-1], score_from)
    model.eval()
    for i in tqdm(range(0, len(windows), batch), desc="eval", unit="batch", disable=not progress, leave=False):
        w = windows[i:i + batch]
        yield model(w[:, :-1])[:, score_from:], w[:, score_from + 1:]


@torch.no_grad()
def evaluate_windows(model: MoEModel, windows: torch.Tensor, batch: int = 8,
                     progress: bool = False, score_from: int = 0) -> EvalResult:
    """Mean next-token NLL, its perplexity and top-1 accuracy over the target tokens of ``windows [n, T]``.

    The logits at position ``j`` of a window predict its token ``j + 1``. Only positions
    ``j >= score_from`` are scored: ``0`` scores every target; ``T // 2`` scores what llama.cpp's
    ``llama-perplexity -c T`` scores (the second half of each context window, ``T - 1 - T // 2``
    targets per window, see :func:`moec.profile.data.context_chunks`).
    """
    nll, correct, count = 0.0, 0, 0
    for logits, target in _scored_batches(model, windows, batch, progress, score_from):
        nll += F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum").item()
        correct += (logits.argmax(-1) == target).sum().item()
        count += target.numel()
    mean = nll / count
    return EvalResult(perplexity=math.exp(mean), top1=correct / count, nll=mean, tokens=count)


@dataclass
class TokenScores:
    """Per-token scores of :func:`score_tokens`: ``nll [n, S]`` (float32) and ``correct [n, S]`` (bool), one
    row per window, so paired comparisons (:mod:`moec.profile.paired`) can resample whole windows."""

    nll: torch.Tensor
    correct: torch.Tensor

    def result(self) -> EvalResult:
        """The same summary as :func:`evaluate_windows` (up to float summation order)."""
        mean = float(self.nll.double().mean())
        return EvalResult(perplexity=math.exp(mean), top1=float(self.correct.double().mean()), nll=mean,
                          tokens=self.correct.numel())


@torch.no_grad()
def score_tokens(model: MoEModel, windows: torch.Tensor, batch: int = 8, progress: bool = False,
                 score_from: int = 0) -> TokenScores:
    """:func:`evaluate_windows` token by token: each scored target's NLL and whether top-1 hit it."""
    nll, correct = [], []
    for logits, target in _scored_batches(model, windows, batch, progress, score_from):
        n, c = target_scores(logits, target)
        nll.append(n)
        correct.append(c)
    return TokenScores(torch.cat(nll), torch.cat(correct))


def target_scores(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(NLL, top-1 hit) of each target: ``logits [..., S, V]`` predict ``target [..., S]``; float32 and bool,
    shaped like ``target``. The per-token rule of :func:`score_tokens` and of a compiled bundle's logits
    (``pipeline/bundle_eval.py``); :func:`evaluate_windows` and the layer-by-layer eval sum the same cross
    entropy in one reduction."""
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), reduction="none")
    return nll.view(target.shape), logits.argmax(-1) == target
