"""Pad MLP intermediate widths that the group size does not divide, so every back end sees the same model.

A quantized ``w2`` (down projection) groups its input channels, the MLP's intermediate width
``I``. When the group size ``g`` does not divide ``I`` (gpt-oss: 2880 with ``g = 128``), moec
appends ``ceil(I / g) * g - I`` zero channels: zero rows in ``w1``/``w3`` and zero columns in
``w2``. ``silu(0) * 0 = 0`` and zero columns add nothing, so the padded float model computes
exactly the original function, and the last group of ``w2`` is a padded partial group. The
padding happens once, on the model, before quantization: the fake-quantized torch model,
the ONNX export and the TVM bundle all get the same padded model and plan (whose fingerprint
is the padded model's; ``provenance.padded_from`` records the original).

Widths on the hidden dimension (``q/k/v``, ``w1``/``w3``, ``lm_head``) cannot be padded without
changing RMSNorm, so a group size that does not divide ``hidden_size`` stays an error.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from moec.core.config import MoEConfig
from moec.core.errors import MoecError
from moec.models.model import MoEModel
from moec.core.plan import BitPlan


def _up(n: int, g: int) -> int:
    return -(-n // g) * g


def padded_widths(cfg: MoEConfig, plan: BitPlan) -> dict[str, int]:
    """Config fields to widen (field -> new width) so that ``plan``'s quantized w2 weights have whole groups."""
    g, out = plan.group_size, {}
    if cfg.expert_intermediate % g and any(b != 16 for ex in plan.experts.values() for b in ex.values()):
        out["expert_intermediate"] = _up(cfg.expert_intermediate, g)
    layers = [i for i in range(cfg.num_layers) if i not in cfg.dense_layers]
    if cfg.shared_intermediate % g and any(plan.tensor_bits(f"layers.{i}.mlp.shared.w2.weight") != 16
                                           for i in layers):
        out["shared_intermediate"] = _up(cfg.shared_intermediate, g)
    if cfg.dense_intermediate % g and any(plan.tensor_bits(f"layers.{i}.mlp.w2.weight") != 16
                                          for i in cfg.dense_layers):
        out["dense_intermediate"] = _up(cfg.dense_intermediate, g)
    return out


def _pad(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    if t.shape[dim] == size:
        return t
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def pad_for_groups(model: MoEModel, plan: BitPlan) -> tuple[MoEModel, BitPlan]:
    """(model, plan) unchanged if every quantized weight has whole groups, else the zero-padded
    model (a new one; same function) and the plan re-keyed to it (validated)."""
    cfg = model.cfg
    widths = padded_widths(cfg, plan)
    if not widths:
        return model, plan
    if getattr(model, "learned_quant", None) is not None:
        raise MoecError(f"group size {plan.group_size} needs padded MLP widths, but this checkpoint's learned "
                        f"quantization parameters are for group size {model.learned_quant.group_size}; use that "
                        "group size")
    new_cfg = replace(cfg, **widths)
    sizes = {"expert": new_cfg.expert_intermediate, "shared": new_cfg.shared_intermediate,
             "dense": new_cfg.dense_intermediate}
    state = {}
    with torch.no_grad():
        for name, t in model.state_dict().items():
            parts = name.split(".")
            kind = ("shared" if ".mlp.shared.w" in name else
                    "expert" if parts[-1] in ("w1", "w2", "w3") and ".mlp." in name else
                    "dense" if ".mlp.w" in name and parts[-1] == "weight" else None)
            if kind is None:
                state[name] = t
                continue
            proj = parts[-1] if kind == "expert" else parts[-2]
            # w1/w3: [.., I, H] rows; w2: [.., H, I] columns
            state[name] = _pad(t, t.dim() - (2 if proj in ("w1", "w3") else 1), sizes[kind])
    padded = MoEModel(new_cfg)
    padded.load_state_dict(state, strict=True)
    new_plan = plan.copy()
    new_plan.model_fingerprint = new_cfg.fingerprint()
    new_plan.provenance = {**plan.provenance, "padded_from": {"fingerprint": cfg.fingerprint(),
                                                              **{k: getattr(cfg, k) for k in widths}}}
    return padded.eval(), new_plan.validate(new_cfg)
