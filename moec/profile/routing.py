"""Run calibration windows through a model with its real routing and collect ExpertStats."""

from __future__ import annotations

import torch
from tqdm import tqdm

from moec.models.model import MoEModel
from moec.profile.stats import ExpertStats, LayerStats, RoutingRecorder


@torch.no_grad()
def collect_stats(model: MoEModel, windows: torch.Tensor, batch: int = 8, progress: bool = False) -> ExpertStats:
    """Routing statistics over every input token of ``windows`` ([n, T+1]; inputs are [:, :-1])."""
    cfg = model.cfg
    stats = ExpertStats(cfg.fingerprint(), cfg.num_experts, cfg.top_k)
    for layer in cfg.moe_layers:
        stats.layers[layer] = LayerStats.zeros(cfg.num_experts)
    model.eval()
    model.set_observer(RoutingRecorder(stats))
    try:
        for i in tqdm(range(0, len(windows), batch), desc="profile", unit="batch", disable=not progress,
                      leave=False):
            x = windows[i:i + batch, :-1]
            model(x)
            stats.tokens += x.numel()
    finally:
        model.set_observer(None)
    return stats
