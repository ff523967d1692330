"""The quantization-aware student: float weights + learnable scales/zeros per (weight, bits), run by functional_call."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from moec.core.errors import MoecError
from moec.core.formats import FLOAT_BITS
from moec.core.inventory import expert_key, non_expert_weights
from moec.core.plan import BitPlan
from moec.finetune.fake_quant import GroupQuant, to_fp16
from moec.models.knobs import merged_weight, set_routing_knobs
from moec.models.learned_quant import LearnedQuant
from moec.models.model import MoEBlock

PROJECTIONS = ("w1", "w3", "w2")


def _qkey(name: str, bits: int) -> str:
    # nn.ModuleDict keys may not contain "."
    return f"{name.replace('.', ':')}@{bits}"


class QATStudent(nn.Module):
    """``model``'s float weights (trained in place) and a :class:`GroupQuant` per (quantized weight, bits).

    ``expert_choices[layer][expert]`` lists every width that expert may be trained at; non-expert
    weights are trained at the plan's bits only. ``model`` is the whole :class:`MoEModel`, or (block-wise
    training) a part of it, e.g. one ``DecoderLayer`` with ``prefix="layers.L."``: its parameter names are
    the canonical names less the prefix, and only the weights the module holds are quantized.
    """

    def __init__(self, model: nn.Module, plan: BitPlan, expert_choices: dict[int, dict[int, list[int]]],
                 init_method: str = "mse", prefix: str = "") -> None:
        super().__init__()
        self.model, self.plan, self.prefix = model, plan, prefix
        self.quant = nn.ModuleDict()
        params = self._params()
        # the plan's architecture knobs, as eval / export apply them: dropped experts masked from the router,
        # merged pairs remapped (their average trained in the kept expert's place), router scores of logits / T
        for block in model.modules():
            if isinstance(block, MoEBlock):
                set_routing_knobs(block, block.layer, plan)
        router_bits = {plan.tensor_bits(n) for n, _ in non_expert_weights(model.cfg) if n.endswith(".mlp.router.weight")}
        if plan.router_temperature != 1.0 and router_bits != {FLOAT_BITS}:
            raise MoecError("finetune with a router_temperature needs a float router in the plan (the temperature "
                            "is packed into the router weight, which learned scales cannot represent)")
        self.tensor_bits = {n: plan.tensor_bits(n) for n, _ in non_expert_weights(model.cfg) if n in params}
        for name, bits in self.tensor_bits.items():
            if bits != FLOAT_BITS:
                self.quant[_qkey(name, bits)] = GroupQuant(params[name], bits, plan.group_size, init_method)
        for layer, experts in expert_choices.items():
            for e, choices in experts.items():
                if not plan.is_stored(layer, e):  # dropped or merged into another: nothing stored, nothing learned
                    continue
                for p in PROJECTIONS:
                    w = params[f"layers.{layer}.mlp.{p}"][e]
                    for bits in choices:
                        if bits != FLOAT_BITS:
                            self.quant[_qkey(expert_key(layer, e, p), bits)] = GroupQuant(
                                w, bits, plan.group_size, init_method)

    def group_quant(self, name: str, bits: int) -> GroupQuant:
        return self.quant[_qkey(name, bits)]

    def _params(self) -> dict[str, nn.Parameter]:
        """The module's parameters by canonical name."""
        return {self.prefix + n: p for n, p in self.model.named_parameters()}

    def fake_weights(self, expert_bits: dict[int, dict[int, int]]) -> dict[str, torch.Tensor]:
        """Every 2-D parameter of the model replaced by its differentiable stored value: fake-quantized, or
        rounded to float16 where the plan keeps it float (as packing stores it). Keys are the module's own
        parameter names (canonical names less the prefix)."""
        params = self._params()
        out: dict[str, torch.Tensor] = {}
        plan, t = self.plan, self.plan.router_temperature
        for name, bits in self.tensor_bits.items():
            w = params[name] / t if t != 1.0 and name.endswith(".mlp.router.weight") else params[name]
            out[name] = to_fp16(w) if bits == FLOAT_BITS else self.group_quant(name, bits)(w)
        for layer, experts in expert_bits.items():
            for p in PROJECTIONS:
                stacked = params[f"layers.{layer}.mlp.{p}"]
                rows = []
                for e, bits in sorted(experts.items()):
                    w = merged_weight(stacked, plan, layer, e)
                    rows.append(torch.zeros_like(w) if not plan.is_stored(layer, e) else
                                to_fp16(w) if bits == FLOAT_BITS else self.group_quant(expert_key(layer, e, p), bits)(w))
                out[f"layers.{layer}.mlp.{p}"] = torch.stack(rows)
        n = len(self.prefix)
        return {k[n:]: v for k, v in out.items()}

    def forward(self, input_ids: torch.Tensor, expert_bits: dict[int, dict[int, int]]) -> torch.Tensor:
        return self.run((input_ids,), expert_bits)

    def run(self, args: tuple, expert_bits: dict[int, dict[int, int]]) -> torch.Tensor:
        """The module's forward on ``args`` with its fake-quantized weights (experts at ``expert_bits``)."""
        return functional_call(self.model, self.fake_weights(expert_bits), args, strict=False)

    def learned(self) -> LearnedQuant:
        """The stored ``(scale, zero)`` of every trained (weight, bits)."""
        lq = LearnedQuant(self.plan.group_size, model_fingerprint=self.model.cfg.fingerprint())
        for key, gq in self.quant.items():
            name, _, bits = key.rpartition("@")
            lq.params[(name.replace(":", "."), int(bits))] = gq.export()
        return lq

    def weight_parameters(self) -> list[nn.Parameter]:
        return list(self.model.parameters())

    def scale_parameters(self) -> list[nn.Parameter]:
        return [gq.log_scale for gq in self.quant.values()]

    def zero_parameters(self) -> list[nn.Parameter]:
        return [gq.zero for gq in self.quant.values()]
