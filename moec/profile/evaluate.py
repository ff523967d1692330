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


@torch.no_grad()
def evaluate_windows(model: MoEModel, windows: torch.Tensor, batch: int = 8,
                     progress: bool = False, score_from: int = 0) -> EvalResult:
    """Mean next-token NLL, its perplexity and top-1 accuracy over the target tokens of ``windows [n, T]``.

    The logits at position ``j`` of a window predict its token ``j + 1``. Only positions
    ``j >= score_from`` are scored: ``0`` scores every target; ``T // 2`` scores what llama.cpp's
    ``llama-perplexity -c T`` scores (the second half of each context window, ``T - 1 - T // 2``
    targets per window, see :func:`moec.profile.data.context_chunks`).
    """
    t = windows.shape[-1]
    if isinstance(score_from, bool) or not isinstance(score_from, int) or not 0 <= score_from < t - 1:
        raise MoecError(f"score_from must be an integer in [0, {t - 2}] for windows of {t} tokens, "
                        f"got {score_from!r}")
    model.eval()
    nll, correct, count = 0.0, 0, 0
    for i in tqdm(range(0, len(windows), batch), desc="eval", unit="batch", disable=not progress, leave=False):
        w = windows[i:i + batch]
        logits = model(w[:, :-1])[:, score_from:]
        target = w[:, score_from + 1:]
        nll += F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum").item()
        correct += (logits.argmax(-1) == target).sum().item()
        count += target.numel()
    mean = nll / count
    return EvalResult(perplexity=math.exp(mean), top1=correct / count, nll=mean, tokens=count)
