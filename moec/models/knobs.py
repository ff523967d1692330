"""Architecture knobs of a plan applied to a torch model: router temperature and dropped experts.

``router_temperature`` T divides the router logits (softmax or sigmoid scores of ``logits / T``):
the router weight is scaled by ``1 / T``, which is exact because the router has no logit bias (plans with
a temperature are refused for routers that have one, gpt-oss); ``pack_model`` does this when it packs the
router, so ONNX export and TVM bundles built from packed weights honour it.
``dropped_experts`` removes experts from the router's choices (an additive ``-inf`` on their logits,
:attr:`MoEBlock.expert_mask`, read by ``TorchOps.linear`` for the router) and zeroes their stored
weights, so a dropped expert can never be chosen nor contribute. ONNX export and TVM compilation
honour it the same way (the ``Ops.mask_experts`` op of their graph backends) and store no weights for
a dropped expert (``pack_model`` leaves it out); so do the layer-by-layer evaluation
(:func:`apply_block_knobs`) and ``finetune`` (:func:`set_routing_knobs`); the streamed export / compile
refuse the knobs (:func:`require_no_knobs`).
"""

from __future__ import annotations

import torch

from moec.core.errors import MoecError
from moec.core.plan import BitPlan
from moec.models.model import MoEModel


@torch.no_grad()
def apply_knobs(model: MoEModel, plan: BitPlan, scale_router: bool = True) -> MoEModel:
    """Apply ``plan``'s router temperature (unless ``scale_router`` is false: the caller already
    packed it into the router weight), dropped experts and merged pairs' routing to ``model`` in place
    (a merged pair's averaged weights are made where weights are packed, :func:`merged_weight`)."""
    if not plan.has_knobs:
        return model
    for layer, block in model.moe_blocks().items():
        apply_block_knobs(block, layer, plan, scale_router)
    return model


@torch.no_grad()
def apply_block_knobs(block, layer: int, plan: BitPlan, scale_router: bool = True) -> None:
    """:func:`apply_knobs` for one MoE block (``layer`` is its index; the layer-by-layer paths use this)."""
    if scale_router and plan.router_temperature != 1.0:
        block.router.weight.div_(plan.router_temperature)
    set_routing_knobs(block, layer, plan)
    gone = list(plan.dropped_experts.get(layer, [])) + list(plan.merged_into(layer))
    if gone:
        for w in (block.w1, block.w3, block.w2):
            w[gone] = 0.0


def set_routing_knobs(block, layer: int, plan: BitPlan) -> None:
    """Only the routing part of the knobs: dropped experts' router mask and merged pairs' expert remap
    (weights untouched: fine-tuning keeps both experts of a merged pair and trains their average)."""
    n = block.cfg.num_experts
    dropped = plan.dropped_experts.get(layer, [])
    if dropped:
        mask = torch.zeros(n)
        mask[dropped] = float("-inf")
        block.expert_mask = mask
    merged = plan.merged_into(layer)
    if merged:
        remap = torch.arange(n)
        remap[list(merged)] = torch.tensor(list(merged.values()))
        block.expert_remap = remap


def merged_weight(stacked: torch.Tensor, plan: BitPlan, layer: int, expert: int) -> torch.Tensor:
    """Expert ``expert``'s weight from the stacked ``[E, ...]`` tensor: its own, or, if it keeps a merged pair,
    ``(1 - share) * own + share * absorbed``."""
    for kept, absorbed, share in plan.merged_experts.get(layer, ()):
        if kept == expert:
            return (1.0 - share) * stacked[kept] + share * stacked[absorbed]
    return stacked[expert]


#: Why the layer-streaming export / compile refuse the knobs (appended to :func:`require_no_knobs`'s line).
STREAMED_WHY = ": its layer-by-layer packer stores every expert as read (no merged average, router scaling or expert mask)"


def require_no_knobs(plan: BitPlan, what: str, why: str = "") -> None:
    """One-line refusal for the paths that do not implement the knobs (streamed export and compile)."""
    for field, present in (("merged_experts", any(plan.merged_experts.values())),
                           ("dropped_experts", any(plan.dropped_experts.values())),
                           ("router_temperature", plan.router_temperature != 1.0)):
        if present:
            raise MoecError(f"{what} does not support plans with {field} yet{why} (evaluation, finetune, in-memory "
                            "ONNX export and compile do); remove that field")
