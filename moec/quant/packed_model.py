"""Quantize and pack every weight of a model under a BitPlan (the tensors every back end consumes)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moec.core.errors import MoecError
from moec.core.formats import DEFAULT_SCALES, FLOAT_BITS
from moec.models.knobs import apply_knobs, merged_weight
from moec.models.model import MoEModel
from moec.quant.cache import QuantCache, cache_key
from moec.quant.gptq import gptq_quantize
from moec.quant.pack import pack, pack_zeros, unpack
from moec.quant.quantize import QuantizedTensor, dequantize, quantize, quantize_with
from moec.core.inventory import expert_key, non_expert_weights, parse_expert_key
from moec.core.plan import BitPlan


#: Plan method quantizing with GPTQ where a calibration Hessian exists (RTN elsewhere).
GPTQ = "gptq"
GPTQ_FALLBACK = "rtn"


@dataclass
class PackedWeight:
    """One [N, K] weight as stored: packed codes + scales + packed zeros, or fp16 when bits == 16.

    ``scales`` names the scale format (``moec.core.formats.SCALE_FORMATS``): ``fp16`` stores one
    float16 scale per group; ``u8`` stores uint8 scale codes in ``scale`` and float16 super-scales
    in ``super_scale`` (``moec.quant.double_quant``).
    """

    shape: tuple[int, int]
    bits: int
    group_size: int
    packed: np.ndarray               # uint8 [N, ceil(K*bits/8)] (or float16 [N, K] when bits == 16)
    scale: np.ndarray | None = None  # float16 [N, K/group] (uint8 codes with scales "u8")
    zero: np.ndarray | None = None   # uint8 [N, ceil(G*bits/8)]
    scales: str = DEFAULT_SCALES
    super_scale: np.ndarray | None = None  # float16 [N, ceil(G/super_groups)] with scales "u8"

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.packed, self.scale, self.zero, self.super_scale) if a is not None)

    def float_scales(self) -> np.ndarray:
        """float32 ``[N, G]`` group scales as dequantization uses them (``code · super_scale`` for ``u8``)."""
        n, k = self.shape
        return QuantizedTensor(np.zeros((n, k), np.uint8), self.scale, np.zeros_like(self.scale, np.uint8),
                               self.bits, self.group_size, self.scales, self.super_scale).float_scales()

    def dequantize(self) -> np.ndarray:
        if self.bits == FLOAT_BITS:
            return self.packed.astype(np.float32)
        n, k = self.shape
        q = unpack(self.packed, self.bits, k)
        zero = unpack(self.zero, self.bits, k // self.group_size)
        return dequantize(QuantizedTensor(q, self.scale, zero, self.bits, self.group_size, self.scales,
                                          self.super_scale))


def pack_weight(w: torch.Tensor | np.ndarray, bits: int, group_size: int, method: str = "rtn",
                importance: np.ndarray | None = None, hessian: np.ndarray | None = None,
                gptq_options: dict | None = None, cache: QuantCache | None = None,
                learned: tuple[np.ndarray, np.ndarray] | None = None,
                scales: str = DEFAULT_SCALES) -> PackedWeight:
    """Quantize and pack one ``[N, K]`` weight (fp16 when ``bits == 16``).

    With ``method == "gptq"`` the weight is quantized by
    :func:`~moec.quant.gptq.gptq_quantize` with ``hessian`` (and ``gptq_options``: ``damp``,
    ``group_method``, ``static_groups``); without a Hessian (no calibration data reached the
    weight) it falls back to round-to-nearest. With a ``cache`` (:class:`~moec.quant.cache.QuantCache`)
    a weight quantized the same way before (same bytes, method, bits, group, calibration) is read
    back instead of quantized again. ``learned`` (the ``(scale, zero)`` that ``moec finetune``
    learned for this weight at ``bits``) replaces any method and bypasses the cache. ``scales``:
    the scale format (``u8``: double-quantized, :mod:`moec.quant.double_quant`; not with GPTQ or
    learned scales).
    """
    arr = w.detach().float().numpy() if isinstance(w, torch.Tensor) else np.asarray(w, np.float32)
    if bits == FLOAT_BITS:
        return PackedWeight(arr.shape, bits, group_size, arr.astype(np.float16))
    if scales != DEFAULT_SCALES:
        if learned is not None:
            raise MoecError(f"scales '{scales}' cannot be used with fine-tuned (learned) fp16 scales; "
                            "quantize the fine-tuned checkpoint with fp16 scales")
        if method == GPTQ and hessian is not None:
            raise MoecError(f"scales '{scales}' are not supported with method 'gptq'; use rtn, mse or hqq")
        method = GPTQ_FALLBACK if method == GPTQ else method
        key = None
        if cache is not None:
            key = cache_key(arr, bits, group_size, method, importance if method in ("mse", "hqq") else None,
                            scales=scales)
            hit = cache.get(key, arr.shape, bits, group_size, scales)
            if hit is not None:
                return PackedWeight(arr.shape, bits, group_size, hit["packed"], hit["scale"], hit["zero"], scales,
                                    hit["super_scale"])
        qt = quantize(arr, bits, group_size, method=method, importance=importance, scales=scales)
        pw = PackedWeight(arr.shape, bits, group_size, pack(qt.q, bits), qt.scale, pack_zeros(qt.zero, bits),
                          qt.scales, qt.super_scale)
        if key is not None:
            cache.put(key, arr.shape, bits, group_size, {"packed": pw.packed, "scale": pw.scale, "zero": pw.zero,
                                                         "super_scale": pw.super_scale}, scales)
        return pw
    if learned is not None:
        qt = quantize_with(arr, bits, group_size, *learned)
        return PackedWeight(arr.shape, bits, group_size, pack(qt.q, bits), qt.scale, pack_zeros(qt.zero, bits))
    if method == GPTQ and hessian is None:
        method = "rtn"
    key = None
    if cache is not None:
        key = cache_key(arr, bits, group_size, method, importance if method in ("mse", "hqq") else None,
                        hessian if method == GPTQ else None, gptq_options if method == GPTQ else None)
        hit = cache.get(key, arr.shape, bits, group_size)
        if hit is not None:
            return PackedWeight(arr.shape, bits, group_size, hit["packed"], hit["scale"], hit["zero"])
    if method == GPTQ:
        qt = gptq_quantize(arr, bits, group_size, hessian, **(gptq_options or {}))
    else:
        qt = quantize(arr, bits, group_size, method=method, importance=importance)
    pw = PackedWeight(arr.shape, bits, group_size, pack(qt.q, bits), qt.scale, pack_zeros(qt.zero, bits))
    if key is not None:
        cache.put(key, arr.shape, bits, group_size, {"packed": pw.packed, "scale": pw.scale, "zero": pw.zero})
    return pw


def pack_model(model: MoEModel, plan: BitPlan, progress=None,
               importance: dict[str, np.ndarray] | None = None,
               hessians: dict[str, np.ndarray] | None = None,
               gptq_options: dict | None = None, cache: QuantCache | None = None) -> dict[str, PackedWeight]:
    """Every 2-D weight of ``model`` packed at its plan bits, keyed by canonical name.

    Expert weights are keyed ``layers.L.mlp.experts.E.{w1,w3,w2}``; other weights by their
    state-dict name. 1-D tensors (norms, biases) are not included: they stay float32.

    With ``plan.method == "gptq"``, a weight with an entry in ``hessians`` (see
    :func:`~moec.profile.importance.expert_hessians`) is quantized by GPTQ with
    ``gptq_options``; every other weight (no calibration data for it: non-expert weights,
    experts calibration never reached, or ``hessians=None``) falls back to round-to-nearest.
    ``importance`` is used by the other non-RTN methods only. ``cache``: see :func:`pack_weight`.
    A fine-tuned model (``model.learned_quant``, see :mod:`moec.models.learned_quant`) quantizes
    every (weight, bits) it learned at the plan's group size with its learned scales and zeros,
    whatever the method.
    Experts the plan drops (``dropped_experts``) or merges into another are left out; the expert a merged
    pair keeps is packed from the pair's averaged weights (:func:`moec.models.knobs.merged_weight`).
    A plan's ``router_temperature`` T is packed into the router weight (``W / T``; routers with a
    logit bias are refused when the plan is checked), so every back end that reads the packed
    weights honours it.
    """
    state = model.state_dict()
    learned = getattr(model, "learned_quant", None)
    out: dict[str, PackedWeight] = {}
    items = [(name, plan.tensor_bits(name)) for name, _ in non_expert_weights(model.cfg)]
    for layer, experts in plan.experts.items():
        for e, bits in experts.items():
            if plan.is_stored(layer, e):  # dropped (never chosen) and absorbed (merged) experts are not stored
                items += [(expert_key(layer, e, p), bits) for p in ("w1", "w3", "w2")]
    for name, bits in items:
        if ".experts." in name:
            layer, e, proj = parse_expert_key(name)
            w = merged_weight(state[f"layers.{layer}.mlp.{proj}"], plan, layer, e)
        else:
            w = state[name]
            if plan.router_temperature != 1.0 and name.endswith(".mlp.router.weight"):
                w = w / plan.router_temperature  # the plan's router temperature: scores of logits / T
        imp = importance.get(name) if importance and plan.method not in ("rtn", GPTQ) else None
        hess = hessians.get(name) if hessians and plan.method == GPTQ else None
        lq = learned.get(name, bits, plan.group_size) if learned is not None and bits != FLOAT_BITS else None
        if lq is not None and plan.router_temperature != 1.0 and name.endswith(".mlp.router.weight"):
            raise MoecError("a plan's router_temperature cannot be applied to a router quantized with learned "
                            "(fine-tuned) scales; keep the router float in the plan or drop the temperature")
        out[name] = pack_weight(w, bits, plan.group_size, plan.method, imp, hess, gptq_options, cache, lq,
                                plan.scales)
        if progress is not None:
            progress.update(1)
    return out


@torch.no_grad()
def fake_quantize_model(model: MoEModel, plan: BitPlan, importance: dict[str, np.ndarray] | None = None,
               hessians: dict[str, np.ndarray] | None = None,
               gptq_options: dict | None = None) -> MoEModel:
    """Fake-quantize ``model`` in place to ``plan`` (weights become their dequantized values), then
    apply the plan's architecture knobs (:func:`moec.models.knobs.apply_knobs`).

    ``hessians`` / ``gptq_options`` are used when ``plan.method == "gptq"`` (see
    :func:`pack_model`).
    """
    packed = pack_model(model, plan, importance=importance, hessians=hessians,
                        gptq_options=gptq_options)
    params = dict(model.named_parameters())
    for name, pw in packed.items():
        deq = torch.from_numpy(pw.dequantize())
        if ".experts." in name:
            layer, e, proj = parse_expert_key(name)
            params[f"layers.{layer}.mlp.{proj}"][e].copy_(deq)
        else:
            params[name].copy_(deq)
    return apply_knobs(model, plan, scale_router=False)  # the temperature is in the packed router
