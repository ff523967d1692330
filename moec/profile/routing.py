"""Run calibration windows through a model with its real routing and collect ExpertStats."""

from __future__ import annotations

import torch
from tqdm import tqdm

from moec.models.model import MoEModel
from moec.profile.stats import ExpertStats, LayerStats, RoutingRecorder


@torch.no_grad()
def run_observed(model: MoEModel, observer, windows: torch.Tensor, batch: int = 8, progress: bool = False,
                 desc: str = "calibration") -> int:
    """Run every window's inputs through ``model`` with ``observer`` attached; returns tokens run."""
    model.eval()
    model.set_observer(observer)
    tokens = 0
    try:
        for i in tqdm(range(0, len(windows), batch), desc=desc, unit="batch", disable=not progress, leave=False):
            x = windows[i:i + batch, :-1]
            model(x)
            tokens += x.numel()
    finally:
        model.set_observer(None)
    return tokens


@torch.no_grad()
def collect_stats(model: MoEModel, windows: torch.Tensor, batch: int = 8, progress: bool = False) -> ExpertStats:
    """Routing statistics over every input token of ``windows`` ([n, T+1]; inputs are [:, :-1])."""
    cfg = model.cfg
    stats = ExpertStats(cfg.fingerprint(), cfg.num_experts, cfg.top_k)
    for layer in cfg.moe_layers:
        stats.layers[layer] = LayerStats.zeros(cfg.num_experts)
    stats.tokens = run_observed(model, RoutingRecorder(stats), windows, batch, progress, desc="profile")
    return stats
