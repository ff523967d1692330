"""GEMV kernel classes of a model and a plan (bit class x shape x routed experts): what the simulator tabulates."""

from __future__ import annotations

from moec.core.config import MoEConfig
from moec.core.errors import MoecError
from moec.core.inventory import expert_shapes, non_expert_weights
from moec.core.plan import BitPlan
from moec.core.targets import load_target
from moec.hardware.candidates import KernelCandidate
from moec.lower.kernels.factory import make_gemv
from moec.lower.kernels.layout import check_kernel_shape


def expert_kernels(cfg: MoEConfig) -> list[tuple[int, int, bool]]:
    """(N, K, per_expert input) of the w1, w3 and w2 calls of an expert class."""
    s = expert_shapes(cfg)
    return [(*s["w1"], False), (*s["w3"], False), (*s["w2"], True)]


def dense_weights(cfg: MoEConfig) -> list[tuple[str, tuple[int, int]]]:
    """Non-expert weights read by GEMVs (the embedding is a row lookup; tied heads stay packed)."""
    return [(n, s) for n, s in non_expert_weights(cfg) if n != "embed.weight"]


def _supported(bits: int, n: int, k: int, group_size: int, target) -> bool:
    """The decode graph's rule (``KernelEmitter.supports``): a kernel exists for this weight."""
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
    tvm_target = load_target(target).tvm()
    experts, dense, unsupported = [], [], []
    for b in bits:
        for n, k, pe in sorted(set(expert_kernels(cfg))):
            if not _supported(b, n, k, group_size, tvm_target):
                continue
            for m in range(cfg.top_k + 1):
                experts.append((KernelCandidate(b, n, k, group_size, cfg.num_experts, cfg.top_k, m, pe, target),
                                f"{b},{n},{k},{int(pe)}"))
    for b in sorted(set(bits) | {16}):
        for n, k in sorted({s for _, s in dense_weights(cfg)}):
            if _supported(b, n, k, group_size, tvm_target):
                dense.append((KernelCandidate(b, n, k, group_size, 1, 1, 1, False, target), f"{b},{n},{k}"))
            else:
                unsupported.append(f"{b},{n},{k}")
    return experts, dense, unsupported


def plan_kernel_candidates(cfg: MoEConfig, plan: BitPlan, target: str = "host") -> list[KernelCandidate]:
    """The GEMV kernel classes (bit class x shape, m = 0..top_k routed) a bundle of ``plan`` calls."""
    tvm_target = load_target(target).tvm()
    g, seen, out = plan.group_size, set(), []
    for layer in cfg.moe_layers:
        for b in sorted(set(plan.experts[layer].values())):
            for n, k, pe in expert_kernels(cfg):
                if (b, n, k, pe) not in seen and _supported(b, n, k, g, tvm_target):
                    seen.add((b, n, k, pe))
                    out += [KernelCandidate(b, n, k, g, cfg.num_experts, cfg.top_k, m, pe, target)
                            for m in range(cfg.top_k + 1)]
    for name, (n, k) in dense_weights(cfg):
        b = plan.tensor_bits(name)
        if (b, n, k) not in seen and _supported(b, n, k, g, tvm_target):
            seen.add((b, n, k))
            out.append(KernelCandidate(b, n, k, g, 1, 1, 1, False, target))
    return out
