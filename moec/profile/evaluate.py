"""Perplexity and next-token top-1 accuracy of a model on token windows (moec's accuracy metric)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

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
                     progress: bool = False) -> EvalResult:
    """Mean next-token NLL, its perplexity and top-1 accuracy over every target token."""
    model.eval()
    nll, correct, count = 0.0, 0, 0
    for i in tqdm(range(0, len(windows), batch), desc="eval", unit="batch", disable=not progress, leave=False):
        w = windows[i:i + batch]
        logits = model(w[:, :-1])
        target = w[:, 1:]
        nll += F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum").item()
        correct += (logits.argmax(-1) == target).sum().item()
        count += target.numel()
    mean = nll / count
    return EvalResult(perplexity=math.exp(mean), top1=correct / count, nll=mean, tokens=count)
