"""Activation statistics of each expert's routed inputs: mean x² per channel and GPTQ Hessians.

For the experts the statistics come from the calibration tokens the router actually sent
to each expert (inputs of w1/w3) and from their SwiGLU activations (inputs of w2). An
expert that calibration never reached has no statistics and falls back to plain
(unweighted) squared error, or for GPTQ to round-to-nearest.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from moec.models.model import MoEModel
from moec.profile.routing import run_observed
from moec.core.inventory import expert_key


class _ExpertInputTap:
    """Accumulates a statistic of each expert weight's routed inputs (w1/w3: x, w2: SwiGLU of x)."""

    def __init__(self, model: MoEModel, stat) -> None:
        self.model, self.stat = model, stat
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}

    def _add(self, name: str, x: torch.Tensor) -> None:
        self.sums[name] = self.sums.get(name, 0) + self.stat(x.double())
        self.counts[name] = self.counts.get(name, 0) + x.shape[0]

    def on_moe(self, layer, x, probs, topk_idx, topk_w, contrib_norm, y_norm) -> None:
        block = self.model.moe_blocks()[layer]
        for e in topk_idx.unique().tolist():
            tok = (topk_idx == e).any(-1).nonzero(as_tuple=True)[0]
            xe = x[tok]
            h = F.silu(xe @ block.w1[e].T) * (xe @ block.w3[e].T)
            self._add(expert_key(layer, e, "w1"), xe)
            self._add(expert_key(layer, e, "w2"), h)


def _sum_sq(x: torch.Tensor) -> np.ndarray:
    return x.pow(2).sum(0).numpy()


def _sum_outer(x: torch.Tensor) -> np.ndarray:
    return (x.T @ x).numpy()


@torch.no_grad()
def expert_hessians(model: MoEModel, windows: torch.Tensor, batch: int = 8) -> dict[str, np.ndarray]:
    """GPTQ Hessians ``H = mean(x x^T)`` over the tokens each expert actually receives.

    Parameters
    ----------
    model : MoEModel
        The float model (statistics are taken on its unquantized activations).
    windows : torch.Tensor
        int64 ``[B, T + 1]`` calibration token windows (the last position is only a target).
    batch : int
        Windows per forward pass.

    Returns
    -------
    dict[str, np.ndarray]
        float64 ``[K, K]`` symmetric PSD matrices keyed ``layers.L.mlp.experts.E.{w1,w3,w2}``
        (see :func:`~moec.quant.packed_model.expert_key`): w1 and w3 share the routed inputs
        ``x [H]`` (the same array), w2 gets the SwiGLU activations
        ``silu(x w1^T) * (x w3^T)`` ``[I]``. Experts the calibration never reached get no entry.
    """
    tap = _ExpertInputTap(model, _sum_outer)
    run_observed(model, tap, windows, batch)
    return finish_hessians(tap)


def finish_hessians(tap: _ExpertInputTap) -> dict[str, np.ndarray]:
    """Symmetrised mean outer products of a Hessian tap (w3 shares w1's inputs)."""
    out: dict[str, np.ndarray] = {}
    for name, s in tap.sums.items():
        h = s / tap.counts[name]
        out[name] = 0.5 * (h + h.T)
        if name.endswith(".w1"):
            out[name[:-2] + "w3"] = out[name]
    return out


@torch.no_grad()
def expert_importance(model: MoEModel, windows: torch.Tensor, batch: int = 8) -> dict[str, np.ndarray]:
    """Mean x² per input channel for every expert weight that calibration reached."""
    tap = _ExpertInputTap(model, _sum_sq)
    run_observed(model, tap, windows, batch)
    out = {}
    for name, s in tap.sums.items():
        mean = (s / tap.counts[name]).astype(np.float32)
        out[name] = mean
        if name.endswith(".w1"):
            out[name[:-2] + "w3"] = mean
    return out
