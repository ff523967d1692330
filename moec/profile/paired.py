"""Paired comparison of two quantized models on the same tokens: the difference in top-1 / NLL with a
bootstrap over windows, and the share of a reference's drop that one of them recovers.

Tokens inside a window are correlated (one passage, one context), so the bootstrap resamples whole
windows with replacement; both models are always scored on the same resampled windows (paired), which
removes the variation the two share (which text is hard) from their difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moec.core.errors import MoecError


@dataclass
class Paired:
    """``b`` against ``a`` on the same tokens (``b − a``; top-1 in points of accuracy, NLL in nats)."""

    tokens: int
    windows: int
    top1_diff: float            # mean top-1 of b minus a
    top1_lo: float              # 95 % bootstrap interval of top1_diff
    top1_hi: float
    top1_se: float              # bootstrap standard error of top1_diff
    nll_diff: float             # mean NLL of b minus a (negative: b has the lower perplexity)
    nll_lo: float
    nll_hi: float
    b_only: float               # tokens b predicts and a does not (mean over plans when several)
    a_only: float               # tokens a predicts and b does not
    recovered: float = math.nan     # (top-1 of b − a) / (top-1 of ref − a): share of a's drop b recovers
    recovered_lo: float = math.nan
    recovered_hi: float = math.nan

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _window_means(x: torch.Tensor) -> torch.Tensor:
    """``[plans, n, S]`` or ``[n, S]`` per-token values → ``[n]`` per-window means (averaged over plans)."""
    x = x.double()
    if x.dim() == 3:
        x = x.mean(0)
    if x.dim() != 2:
        raise MoecError(f"per-token scores must be [windows, tokens] or [plans, windows, tokens], got {tuple(x.shape)}")
    return x.mean(1)


def paired(a_correct: torch.Tensor, b_correct: torch.Tensor, a_nll: torch.Tensor, b_nll: torch.Tensor,
           ref_correct: torch.Tensor | None = None, samples: int = 2000, seed: int = 0,
           min_drop: float = 5e-4) -> Paired:
    """Compare ``b`` with ``a``: per-token correctness / NLL ``[n, S]``, or ``[plans, n, S]`` for the mean over
    several plans scored on the same windows (each plan's a and b paired). With ``ref_correct`` (e.g. the float
    model, ``[n, S]``) also the share of a's top-1 drop below ref that b recovers, when that drop is at least
    ``min_drop``; its interval comes from the same bootstrap draws."""
    shapes = {tuple(t.shape) for t in (a_correct, b_correct, a_nll, b_nll)}
    if len(shapes) != 1:
        raise MoecError(f"paired scores must have one shape, got {sorted(shapes)}")
    n = a_correct.shape[-2]
    if n < 2:
        raise MoecError("a paired bootstrap needs at least 2 windows")
    if ref_correct is not None and tuple(ref_correct.shape) != tuple(a_correct.shape[-2:]):
        raise MoecError(f"reference scores {tuple(ref_correct.shape)} do not match {tuple(a_correct.shape[-2:])}")
    ca, cb = _window_means(a_correct), _window_means(b_correct)
    dn = _window_means(b_nll) - _window_means(a_nll)
    cr = _window_means(ref_correct) if ref_correct is not None else None
    idx = torch.randint(n, (samples, n), generator=torch.Generator().manual_seed(seed))
    boot_a, boot_b, boot_n = ca[idx].mean(1), cb[idx].mean(1), dn[idx].mean(1)
    q = torch.tensor([0.025, 0.975], dtype=torch.float64)
    d_lo, d_hi = torch.quantile(boot_b - boot_a, q).tolist()
    n_lo, n_hi = torch.quantile(boot_n, q).tolist()
    ac, bc = a_correct.bool(), b_correct.bool()
    plans = a_correct.shape[0] if a_correct.dim() == 3 else 1
    out = Paired(tokens=a_correct.shape[-1] * n, windows=n,
                 top1_diff=float(cb.mean() - ca.mean()), top1_lo=d_lo, top1_hi=d_hi,
                 top1_se=float((boot_b - boot_a).std()),
                 nll_diff=float(dn.mean()), nll_lo=n_lo, nll_hi=n_hi,
                 b_only=float((bc & ~ac).sum()) / plans, a_only=float((ac & ~bc).sum()) / plans)
    if cr is not None and float(cr.mean() - ca.mean()) >= min_drop:
        out.recovered = float((cb.mean() - ca.mean()) / (cr.mean() - ca.mean()))
        drop = cr[idx].mean(1) - boot_a
        ok = drop > min_drop / 4  # draws where a's drop all but vanished say nothing about the share
        rec = (boot_b - boot_a)[ok] / drop[ok]
        if len(rec) >= samples // 2:
            out.recovered_lo, out.recovered_hi = torch.quantile(rec, q).tolist()
    return out
