"""ExpertStats: per layer × expert activation frequency, gate mass and output contribution."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from moec.core.errors import MoecError
from moec.core.io import atomic_write_json, read_json

STATS_VERSION = 1


@dataclass
class LayerStats:
    """Sums over calibration tokens for one MoE layer (one entry per expert)."""

    counts: np.ndarray        # tokens routed to the expert (any top-k slot)
    gate_mass: np.ndarray     # sum of the routing weights of those slots
    prob_mass: np.ndarray     # sum of the full softmax router probability over all tokens
    contrib_sum: np.ndarray   # sum of ||g·E(x)|| / ||y|| over the routed tokens

    @classmethod
    def zeros(cls, num_experts: int) -> "LayerStats":
        return cls(*(np.zeros(num_experts) for _ in range(4)))


@dataclass
class ExpertStats:
    """Routing statistics of a model on calibration text (real routing, never forced)."""

    model_fingerprint: str
    num_experts: int
    top_k: int
    tokens: int = 0
    layers: dict[int, LayerStats] = field(default_factory=dict)
    data_sha256: str = ""
    sensitivity: dict | None = None

    def frequency(self, layer: int) -> np.ndarray:
        """Fraction of tokens routed to each expert (sums to top_k over experts)."""
        return self.layers[layer].counts / max(self.tokens, 1)

    def gate_share(self, layer: int) -> np.ndarray:
        """Mean routing weight per token given to each expert (sums to <= 1)."""
        return self.layers[layer].gate_mass / max(self.tokens, 1)

    def contribution(self, layer: int) -> np.ndarray:
        """Mean ||g·E(x)|| / ||y|| over the tokens routed to the expert (0 if never routed)."""
        s = self.layers[layer]
        return np.divide(s.contrib_sum, s.counts, out=np.zeros_like(s.contrib_sum), where=s.counts > 0)

    def never_activated(self) -> list[tuple[int, int]]:
        return [(l, e) for l, s in self.layers.items() for e in np.flatnonzero(s.counts == 0).tolist()]

    def spread(self, layer: int) -> dict[str, float]:
        """How uneven routing is: max/min frequency, coefficient of variation, normalised entropy."""
        f = self.frequency(layer)
        p = f / f.sum() if f.sum() > 0 else np.full_like(f, 1 / len(f))
        nz = p[p > 0]
        return {
            "max": float(f.max()), "min": float(f.min()),
            "max_over_min": float(f.max() / f.min()) if f.min() > 0 else float("inf"),
            "cv": float(f.std() / f.mean()) if f.mean() > 0 else 0.0,
            "entropy": float(-(nz * np.log(nz)).sum() / np.log(len(f))),
        }

    # -- persistence ---------------------------------------------------------------
    def to_json(self) -> dict:
        layers = {str(l): {k: getattr(s, k).tolist() for k in ("counts", "gate_mass", "prob_mass", "contrib_sum")}
                  for l, s in self.layers.items()}
        derived = {str(l): {"frequency": self.frequency(l).tolist(), "contribution": self.contribution(l).tolist(),
                            "spread": self.spread(l)} for l in self.layers}
        return {"version": STATS_VERSION, "model_fingerprint": self.model_fingerprint,
                "num_experts": self.num_experts, "top_k": self.top_k, "tokens": self.tokens,
                "data_sha256": self.data_sha256, "layers": layers, "derived": derived,
                "never_activated": [list(x) for x in self.never_activated()],
                "sensitivity": self.sensitivity}

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ExpertStats":
        d = read_json(path, "profile")
        if d.get("version") != STATS_VERSION:
            raise MoecError(f"profile '{path}' has version {d.get('version')}, expected {STATS_VERSION}")
        try:
            layers = {int(l): LayerStats(*(np.asarray(v[k], dtype=float) for k in
                                          ("counts", "gate_mass", "prob_mass", "contrib_sum")))
                      for l, v in d["layers"].items()}
            return cls(d["model_fingerprint"], d["num_experts"], d["top_k"], d["tokens"], layers,
                       d.get("data_sha256", ""), d.get("sensitivity"))
        except (KeyError, TypeError, ValueError) as exc:
            raise MoecError(f"profile '{path}' is malformed: {exc}") from None


class RoutingRecorder:
    """RoutingObserver that accumulates :class:`ExpertStats` while the model runs."""

    def __init__(self, stats: ExpertStats) -> None:
        self.stats = stats

    def on_moe(self, layer: int, x: torch.Tensor, probs: torch.Tensor, topk_idx: torch.Tensor,
               topk_w: torch.Tensor, contrib_norm: torch.Tensor, y_norm: torch.Tensor) -> None:
        s = self.stats.layers.setdefault(layer, LayerStats.zeros(self.stats.num_experts))
        e = self.stats.num_experts
        idx = topk_idx.reshape(-1)
        s.counts += torch.bincount(idx, minlength=e).numpy()
        s.gate_mass += torch.zeros(e).index_add_(0, idx, topk_w.reshape(-1).float()).numpy()
        s.prob_mass += probs.sum(0).double().numpy()
        ratio = (contrib_norm / y_norm.clamp_min(1e-12)[:, None]).reshape(-1).float()
        s.contrib_sum += torch.zeros(e).index_add_(0, idx, ratio).numpy()
