"""Run-time plans of nested bundles: a plan's expert widths as the int32 tables the compiled graph reads.

A nested bundle (``moec compile --nested B``) stores every routed expert once at ``B`` bits
(``moec.core.formats.NESTED_FORMATS``) and reads, per layer, a parameter
``layers.L.experts.prec`` (int32 ``[E]``): the width each expert is served at. Both the compile
side (the plan at load) and the runtime (``BundleSession.set_plan``) build those tables here, so
a plan is checked by one rule: every layer and expert of the model named, nothing else, and every
width one the storage serves.
"""

from __future__ import annotations

import numpy as np

from moec.core.config import MoEConfig
from moec.core.errors import MoecError
from moec.core.formats import get_nested_format
from moec.core.plan import BitPlan


def prec_table_name(layer: int) -> str:
    """Parameter name of layer ``layer``'s run-time width table (nested parameter sets)."""
    return f"layers.{layer}.experts.prec"


def plan_widths(cfg: MoEConfig, plan: BitPlan, storage_bits: int) -> dict[str, np.ndarray]:
    """The run-time tables of ``plan``'s expert widths (int32 ``[E]`` per layer) for nested storage.

    Raises a one-line :class:`MoecError` for a width the storage does not serve, a missing or
    unknown layer or expert.
    """
    fmt = get_nested_format(storage_bits)
    if plan.model_fingerprint and plan.model_fingerprint != cfg.fingerprint():
        raise MoecError(f"plan is for another model (fingerprint {plan.model_fingerprint}, this bundle's model is "
                        f"{cfg.fingerprint()})")
    layers = list(cfg.moe_layers)
    extra = sorted(set(plan.experts) - set(layers))
    if extra:
        raise MoecError(f"plan names MoE layer {extra[0]}; the model's MoE layers are {layers[0]}..{layers[-1]}"
                        if layers else f"plan names MoE layer {extra[0]}; the model has none")
    out = {}
    for layer in layers:
        experts = plan.experts.get(layer, {})
        unknown = sorted(set(experts) - set(range(cfg.num_experts)))
        if unknown:
            raise MoecError(f"plan names expert {unknown[0]} of layer {layer}; the model has experts "
                            f"0..{cfg.num_experts - 1}")
        row = []
        for e in range(cfg.num_experts):
            if e not in experts:
                raise MoecError(f"plan has no width for expert {e} of layer {layer}")
            bits = experts[e]
            if bits not in fmt.derived_bits:
                raise MoecError(f"layer {layer} expert {e}: {bits} bits cannot be served from {fmt.name} storage "
                                f"(it serves {', '.join(map(str, fmt.derived_bits))})")
            row.append(bits)
        out[prec_table_name(layer)] = np.array(row, np.int32)
    return out


def storage_plan(plan: BitPlan, storage_bits: int) -> BitPlan:
    """``plan`` with every routed expert at ``storage_bits``: what a nested bundle packs (other weights kept)."""
    out = plan.copy()
    out.experts = {layer: {e: storage_bits for e in experts} for layer, experts in plan.experts.items()}
    return out
