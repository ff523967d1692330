"""What the simulator is calibrated from: GEMV kernel classes, calibration bundles, routing of a token stream."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from moec.errors import MoecError
from moec.hardware.candidates import KernelCandidate
from moec.models.config import MoEConfig
from moec.search.plan import BitPlan


def _supported(bits: int, n: int, k: int, group_size: int, target) -> bool:
    """The decode graph's rule (``KernelEmitter.supports``): a kernel exists for this weight."""
    from moec.lower.kernels import make_gemv
    from moec.lower.kernels.layout import check_kernel_shape
    try:
        check_kernel_shape(bits, n, k, group_size)
        make_gemv(bits, n, k, group_size, 1, 1, target)
        return True
    except MoecError:
        return False


def kernel_candidates(cfg: MoEConfig, bits: tuple[int, ...], group_size: int, target: str):
    """(expert kernels, dense kernels, unsupported dense keys) to measure for the simulator's tables.

    Expert entries are ``(candidate, "bits,N,K,per_expert")`` for ``m = 0..top_k`` routed experts;
    dense entries ``(candidate, "bits,N,K")``; unsupported dense weights run on reference code.
    """
    from moec.hardware.simulator import _dense_weights, _expert_kernels
    from moec.hardware.targets import load_target

    tvm_target = load_target(target).tvm()
    experts, dense, unsupported = [], [], []
    for b in bits:
        for n, k, pe in sorted(set(_expert_kernels(cfg))):
            if not _supported(b, n, k, group_size, tvm_target):
                continue
            for m in range(cfg.top_k + 1):
                experts.append((KernelCandidate(b, n, k, group_size, cfg.num_experts, cfg.top_k, m, pe, target),
                                f"{b},{n},{k},{int(pe)}"))
    for b in sorted(set(bits) | {16}):
        for n, k in sorted({s for _, s in _dense_weights(cfg)}):
            if _supported(b, n, k, group_size, tvm_target):
                dense.append((KernelCandidate(b, n, k, group_size, 1, 1, 1, False, target), f"{b},{n},{k}"))
            else:
                unsupported.append(f"{b},{n},{k}")
    return experts, dense, unsupported


def plan_kernel_candidates(cfg: MoEConfig, plan: BitPlan, target: str = "host") -> list[KernelCandidate]:
    """The GEMV kernel classes (bit class x shape, m = 0..top_k routed) a bundle of ``plan`` calls."""
    from moec.hardware.simulator import _dense_weights, _expert_kernels
    from moec.hardware.targets import load_target

    tvm_target = load_target(target).tvm()
    g, seen, out = plan.group_size, set(), []
    for layer in cfg.moe_layers:
        for b in sorted(set(plan.experts[layer].values())):
            for n, k, pe in _expert_kernels(cfg):
                if (b, n, k, pe) not in seen and _supported(b, n, k, g, tvm_target):
                    seen.add((b, n, k, pe))
                    out += [KernelCandidate(b, n, k, g, cfg.num_experts, cfg.top_k, m, pe, target)
                            for m in range(cfg.top_k + 1)]
    for name, (n, k) in _dense_weights(cfg):
        b = plan.tensor_bits(name)
        if (b, n, k) not in seen and _supported(b, n, k, g, tvm_target):
            seen.add((b, n, k))
            out.append(KernelCandidate(b, n, k, g, 1, 1, 1, False, target))
    return out


def plan_id(plan: BitPlan) -> str:
    return hashlib.sha256(json.dumps(plan.to_json(), sort_keys=True).encode()).hexdigest()[:12]


def build_bundles(checkpoint: str | os.PathLike, plans: list[BitPlan], root: Path, target: str = "host",
                  progress: bool = False) -> list[Path]:
    """Compile ``checkpoint`` under each plan into ``root/bundle-<plan id>`` (kept ones are reused)."""
    from moec.api import CompileConfig, compile_bundle

    out = []
    root.mkdir(parents=True, exist_ok=True)
    for plan in tqdm(plans, desc="build bundles", disable=not progress):
        pid = plan_id(plan)
        bundle = root / f"bundle-{pid}"
        manifest = bundle / "manifest.json"
        if not (manifest.is_file() and json.loads(manifest.read_text()).get("plan") == plan.to_json()
                and json.loads(manifest.read_text())["target"]["name"] == target):
            plan_file = root / f"plan-{pid}.json"
            plan.save(plan_file)
            compile_bundle(CompileConfig(checkpoint=checkpoint, out=bundle, target=target, plan=plan_file,
                                         group_size=plan.group_size, method=plan.method))
        out.append(bundle)
    return out


def routing_frequencies(checkpoint: str | os.PathLike, plan: BitPlan | None, tokens: list[int]) -> np.ndarray:
    """[num_layers, E] fraction of the decode steps of ``tokens`` that route to each expert.

    Runs the fake-quantized model (``plan``; float if None) on the stream, which is what the
    bundle's decode steps compute, so these are the routings the measured steps took.
    """
    import torch

    from moec.models.checkpoint import load_checkpoint
    from moec.profile.routing import collect_stats
    from moec.quant.packed_model import apply_plan

    model = load_checkpoint(checkpoint)
    if plan is not None:
        apply_plan(model, plan)
    stats = collect_stats(model, torch.tensor([list(tokens) + [0]], dtype=torch.long), batch=1)
    cfg = model.cfg
    out = np.zeros((cfg.num_layers, cfg.num_experts))
    for layer in cfg.moe_layers:
        out[layer] = stats.frequency(layer)
    return out
