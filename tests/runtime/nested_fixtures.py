"""Shared helpers of the nested-bundle tests: a mixed 2/3/4/8 plan and the torch model it computes."""

from __future__ import annotations

import torch

from moec.core.plan import BitPlan, uniform_plan
from moec.models.checkpoint import load_checkpoint
from moec.quant.nested import dequantize_nested, nest
from moec.quant.packed_model import fake_quantize_model, pack_weight

GS = 32


def mixed_plan(cfg) -> BitPlan:
    plan = uniform_plan(cfg, 8, GS)
    widths = (2, 3, 4, 8)
    plan.experts = {layer: {e: widths[(e + layer) % 4] for e in range(cfg.num_experts)} for layer in plan.experts}
    return plan


def derived_model(ckpt, plan: BitPlan):
    """The torch model a nested bundle under ``plan`` computes: non-experts fake-quantized at their compiled
    width, each expert replaced by its derived width of the 8-bit nested storage (float32)."""
    model = load_checkpoint(ckpt)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fake_quantize_model(model, uniform_plan(model.cfg, 8, GS))
    with torch.no_grad():
        for layer, experts in plan.experts.items():
            for proj in ("w1", "w3", "w2"):
                stack = dict(model.named_parameters())[f"layers.{layer}.mlp.{proj}"]
                for e, bits in experts.items():
                    w = state[f"layers.{layer}.mlp.{proj}"][e].numpy()
                    stack[e].copy_(torch.from_numpy(dequantize_nested(nest(pack_weight(w, 8, GS)), bits)))
    return model
