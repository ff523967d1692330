"""What the latency simulator is fitted to: bundles of calibration plans and the routing of their token stream."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from moec.core.plan import BitPlan
from moec.lower.bundler import PlanBundler
from moec.models.checkpoint import load_checkpoint
from moec.profile.routing import collect_stats
from moec.quant.packed_model import fake_quantize_model


def plan_id(plan: BitPlan) -> str:
    return hashlib.sha256(json.dumps(plan.to_json(), sort_keys=True).encode()).hexdigest()[:12]


def build_bundles(checkpoint: str | os.PathLike, plans: list[BitPlan], root: Path, target: str = "host",
                  progress: bool = False) -> list[Path]:
    """Compile ``checkpoint`` under each plan into ``root/bundle-<plan id>`` (kept ones are reused)."""
    bundler = PlanBundler(checkpoint, target)
    out = []
    root.mkdir(parents=True, exist_ok=True)
    for plan in tqdm(plans, desc="build bundles", disable=not progress):
        pid = plan_id(plan)
        bundle = root / f"bundle-{pid}"
        manifest = bundle / "manifest.json"
        if not (manifest.is_file() and json.loads(manifest.read_text()).get("plan") == plan.to_json()
                and json.loads(manifest.read_text())["target"]["name"] == target):
            plan.save(root / f"plan-{pid}.json")
            bundler(plan, bundle)
        out.append(bundle)
    return out


def routing_frequencies(checkpoint: str | os.PathLike, plan: BitPlan | None, tokens: list[int]) -> np.ndarray:
    """[num_layers, E] fraction of the decode steps of ``tokens`` that route to each expert.

    Runs the fake-quantized model (``plan``; float if None) on the stream, which is what the
    bundle's decode steps compute, so these are the routings the measured steps took.
    """
    model = load_checkpoint(checkpoint)
    if plan is not None:
        fake_quantize_model(model, plan)
    stats = collect_stats(model, torch.tensor([list(tokens) + [0]], dtype=torch.long), batch=1)
    cfg = model.cfg
    out = np.zeros((cfg.num_layers, cfg.num_experts))
    for layer in cfg.moe_layers:
        out[layer] = stats.frequency(layer)
    return out
