"""Quantization sensitivity AccuracyLoss(layer, expert, bits): a cheap proxy and an exact measurement.

* **proxy** — gate-weighted output distortion on the calibration tokens routed to the
  expert: ``Σ_t g_t² ‖E_b(x_t) − E(x_t)‖² / Σ_t ‖y_t‖²`` where the sums run over the
  tokens routed to ``e`` (numerator) and all tokens (denominator) of that layer. It grows
  with activation frequency, gate weight and per-token error, so it needs no held-out run.
* **exact** — increase of the mean held-out NLL when only that expert is quantized to
  ``b`` bits (every other weight float). Layers before ``l`` are run once and cached.

Experts never activated in calibration get a proxy of 0 (no routed token carries an
error); their exact value is still measured, since held-out text may reach them.

The pseudo-width :data:`~moec.core.formats.DROPPED_BITS` (0) measures **dropping** the expert (a plan's
``dropped_experts``): its router logit is masked to ``-inf``, so its tokens pick the next expert and the
gates renormalise as the model's routing does. The proxy is then ``Σ_t ‖y'_t − y_t‖² / Σ_t ‖y_t‖²`` over the
tokens routed to the expert, ``y'`` the routed output with the expert masked (the same units as the bit
columns, whose ``g_t (E_b − E)`` is exactly ``y'_t − y_t`` when only that expert changes); the exact value is
the held-out NLL increase with the expert masked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from moec.core.config import rope_inv_freq
from moec.core.formats import DROPPED_BITS
from moec.models.model import MoEModel, rope_tables
from moec.profile.routing import run_observed
from moec.quant.fake import fake_quantize


@dataclass
class Sensitivity:
    bits: list[int]
    group_size: int
    method: str
    proxy: dict[int, np.ndarray] = field(default_factory=dict)   # layer -> [E, len(bits)]
    exact: dict[int, np.ndarray] = field(default_factory=dict)   # layer -> [E, len(bits)]

    def spearman(self) -> float | None:
        """Rank correlation of proxy and exact over every (layer, expert, bits) entry."""
        if not self.proxy or not self.exact:
            return None
        from scipy.stats import spearmanr
        layers = sorted(set(self.proxy) & set(self.exact))
        a = np.concatenate([self.proxy[l].ravel() for l in layers])
        b = np.concatenate([self.exact[l].ravel() for l in layers])
        return float(spearmanr(a, b).statistic)

    def to_json(self) -> dict:
        d = {"bits": self.bits, "group_size": self.group_size, "method": self.method,
             "proxy": {str(l): v.tolist() for l, v in self.proxy.items()},
             "exact": {str(l): v.tolist() for l, v in self.exact.items()}}
        d["spearman"] = self.spearman()
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Sensitivity":
        return cls(list(d["bits"]), int(d["group_size"]), str(d["method"]),
                   {int(l): np.asarray(v) for l, v in d.get("proxy", {}).items()},
                   {int(l): np.asarray(v) for l, v in d.get("exact", {}).items()})


class _InputTap:
    """Observer that keeps each MoE layer's routed inputs, slot weights and output norms."""

    def __init__(self) -> None:
        self.data: dict[int, list] = {}

    def on_moe(self, layer, x, probs, topk_idx, topk_w, contrib_norm, y_norm) -> None:
        self.data.setdefault(layer, []).append((x.detach(), topk_idx, topk_w.detach(), y_norm))


def _quantized_expert(weights: tuple[torch.Tensor, ...], bits: int, group: int, method: str) -> tuple[torch.Tensor, ...]:
    return tuple(fake_quantize(w, bits, group, method) for w in weights)


def _run_expert(x, w1, w3, w2):
    return (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T


def drop_mask(block, expert: int) -> torch.Tensor:
    """``block``'s router-logit mask with ``expert`` also dropped (``-inf``)."""
    mask = torch.zeros(block.cfg.num_experts) if block.expert_mask is None else block.expert_mask.clone()
    mask[expert] = float("-inf")
    return mask


def routed_output(block, x: torch.Tensor) -> torch.Tensor:
    """The routed experts' gated sum of ``block`` on rows ``x`` (no shared expert, no observer)."""
    observer, block.observer = block.observer, None
    try:
        _, ids, weights = block.route(x)
        return block.dispatch(x, ids, weights)[0]
    finally:
        block.observer = observer


def drop_distortion(block, x: torch.Tensor, expert: int) -> float:
    """``Σ ‖y' − y‖²`` over rows ``x``, ``y'`` the routed output with ``expert`` masked from the router."""
    ref = routed_output(block, x)
    saved, block.expert_mask = block.expert_mask, drop_mask(block, expert)
    try:
        return (routed_output(block, x) - ref).pow(2).sum().item()
    finally:
        block.expert_mask = saved


@torch.no_grad()
def layer_proxy(block, chunks: list, bits: list[int], group_size: int, method: str, bar=None) -> np.ndarray:
    """Proxy [E, len(bits)] of one MoE block from its tapped (x, topk_idx, topk_w, y_norm) chunks."""
    x = torch.cat([c[0] for c in chunks])
    idx = torch.cat([c[1] for c in chunks])
    gate = torch.cat([c[2] for c in chunks])
    energy = torch.cat([c[3] for c in chunks]).pow(2).sum().item()
    res = np.zeros((block.cfg.num_experts, len(bits)))
    for e in range(block.cfg.num_experts):
        tok, slot = (idx == e).nonzero(as_tuple=True)
        if len(tok):
            xe, g = x[tok], gate[tok, slot]
            ref = _run_expert(xe, block.w1[e], block.w3[e], block.w2[e])
            for j, b in enumerate(bits):
                if b == DROPPED_BITS:
                    res[e, j] = drop_distortion(block, xe, e) / max(energy, 1e-30)
                    continue
                weights = (block.w1[e], block.w3[e], block.w2[e])
                q = _run_expert(xe, *_quantized_expert(weights, b, group_size, method))
                res[e, j] = ((g[:, None] * (q - ref)).pow(2).sum() / max(energy, 1e-30)).item()
        if bar is not None:
            bar.update(1)
    return res


@torch.no_grad()
def proxy_sensitivity(model: MoEModel, windows: torch.Tensor, bits: list[int], group_size: int = 64,
                      method: str = "rtn", batch: int = 8, progress: bool = False) -> dict[int, np.ndarray]:
    """Gate-weighted output distortion per (layer, expert, bits) on calibration ``windows``."""
    tap = _InputTap()
    run_observed(model, tap, windows, batch)
    out: dict[int, np.ndarray] = {}
    blocks = model.moe_blocks()
    total = len(blocks) * model.cfg.num_experts
    bar = tqdm(total=total, desc="proxy sensitivity", unit="expert", disable=not progress, leave=False)
    for layer, chunks in tap.data.items():
        out[layer] = layer_proxy(blocks[layer], chunks, bits, group_size, method, bar)
    bar.close()
    return out


@torch.no_grad()
def exact_sensitivity(model: MoEModel, windows: torch.Tensor, bits: list[int], group_size: int = 64,
                      method: str = "rtn", progress: bool = False) -> dict[int, np.ndarray]:
    """Held-out NLL increase when only (layer, expert) is quantized to each bit-width."""
    cfg = model.cfg
    x_in, target = windows[:, :-1], windows[:, 1:]
    cos, sin = rope_tables(cfg.rope_dim, cfg.rope_theta, torch.arange(x_in.shape[1]), rope_inv_freq(cfg))

    def tail_nll(h: torch.Tensor, start: int) -> float:
        for i in range(start, cfg.num_layers):
            h = model.layers[i](h, cos, sin, None, i)
        logits = model.lm_head(model.norm(h)) * cfg.logits_scale
        return F.cross_entropy(logits.flatten(0, 1), target.flatten()).item()

    blocks = model.moe_blocks()
    bar = tqdm(total=len(blocks) * cfg.num_experts * len(bits), desc="exact sensitivity", unit="eval",
               disable=not progress, leave=False)
    out: dict[int, np.ndarray] = {}
    h = model.embed(x_in) * cfg.embedding_scale
    base = tail_nll(h, 0)
    for layer in range(cfg.num_layers):
        if layer in blocks:
            block = blocks[layer]
            res = np.zeros((cfg.num_experts, len(bits)))
            for e in range(cfg.num_experts):
                saved = (block.w1[e].clone(), block.w3[e].clone(), block.w2[e].clone())
                for j, b in enumerate(bits):
                    if b == DROPPED_BITS:
                        mask, block.expert_mask = block.expert_mask, drop_mask(block, e)
                        res[e, j] = tail_nll(h, layer) - base
                        block.expert_mask = mask
                        bar.update(1)
                        continue
                    for w, q in zip((block.w1, block.w3, block.w2), _quantized_expert(saved, b, group_size, method)):
                        w[e].copy_(q)
                    res[e, j] = tail_nll(h, layer) - base
                    bar.update(1)
                for w, s in zip((block.w1, block.w3, block.w2), saved):
                    w[e].copy_(s)
            out[layer] = res
        h = model.layers[layer](h, cos, sin, None, layer)
    bar.close()
    return out
