"""Learned quantization parameters a fine-tuned checkpoint carries (``moec_quant.safetensors``).

``moec finetune`` learns, for each quantized 2-D weight and each bit-width it trained, one fp16
scale and one integer zero per group (the affine format of ``moec.core.formats``). They are
stored beside the HF weights (``moec_quant/learned.safetensors``); ``load_checkpoint`` attaches them to the model
(``model.learned_quant``) and ``moec.quant.packed_model.pack_model`` quantizes a weight with
them whenever the plan asks for a (weight, bits) they cover at their group size, so eval,
export and compile use exactly the codes that training used.

Keys are ``<canonical name>@<bits>.scale`` (float16 ``[N, K / group]``) and ``.zero`` (uint8,
same shape); expert weights use the inventory's ``layers.L.mlp.experts.E.w1|w3|w2`` names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from moec.core.config import MoEConfig
from moec.core.errors import MoecError
from moec.core.formats import QUANT_BITS
from moec.core.inventory import expert_key, expert_shapes, non_expert_weights

#: Inside a subdirectory, so loaders that read every top-level ``*.safetensors`` file never see it.
LEARNED_QUANT_FILE = "moec_quant/learned.safetensors"
FORMAT = "moec-learned-quant"


@dataclass
class LearnedQuant:
    """Per-group ``(scale float16, zero uint8)`` keyed by ``(canonical weight name, bits)``."""

    group_size: int
    params: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    model_fingerprint: str = ""

    def get(self, name: str, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The learned ``(scale, zero)`` of ``name`` at ``bits``, or None (other group size, not trained)."""
        if group_size != self.group_size:
            return None
        return self.params.get((name, int(bits)))

    def bits_of(self, name: str) -> list[int]:
        return sorted(b for (n, b) in self.params if n == name)

    def save(self, directory: str | os.PathLike) -> None:
        tensors = {}
        for (name, bits), (scale, zero) in sorted(self.params.items()):
            tensors[f"{name}@{bits}.scale"] = torch.from_numpy(np.ascontiguousarray(scale, np.float16))
            tensors[f"{name}@{bits}.zero"] = torch.from_numpy(np.ascontiguousarray(zero, np.uint8))
        path = Path(directory) / LEARNED_QUANT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path),
                  metadata={"format": FORMAT, "version": "1", "group_size": str(self.group_size),
                            "model_fingerprint": self.model_fingerprint})

    def validate(self, cfg: MoEConfig, source: str = LEARNED_QUANT_FILE) -> "LearnedQuant":
        """Every entry names a weight of ``cfg`` with the right group shape, valid bits and zero range."""
        shapes = dict(non_expert_weights(cfg))
        for layer in cfg.moe_layers:
            for e in range(cfg.num_experts):
                for p, s in expert_shapes(cfg).items():
                    shapes[expert_key(layer, e, p)] = s
        for (name, bits), (scale, zero) in self.params.items():
            if name not in shapes:
                raise MoecError(f"{source}: '{name}' is not a quantizable weight of this model")
            if bits not in QUANT_BITS:
                raise MoecError(f"{source}: '{name}' has unsupported bits {bits}")
            n, k = shapes[name]
            if k % self.group_size:
                raise MoecError(f"{source}: group size {self.group_size} does not divide '{name}' (K={k})")
            want = (n, k // self.group_size)
            if scale.shape != want or zero.shape != want:
                raise MoecError(f"{source}: '{name}@{bits}' has groups {scale.shape}, expected {want}")
            if not np.isfinite(scale.astype(np.float32)).all() or (scale.astype(np.float32) <= 0).any():
                raise MoecError(f"{source}: '{name}@{bits}' has non-positive or non-finite scales")
            if int(zero.max(initial=0)) > (1 << bits) - 1:
                raise MoecError(f"{source}: '{name}@{bits}' has zero points outside the {bits}-bit range")
        return self


def load_learned_quant(directory: str | os.PathLike, cfg: MoEConfig) -> LearnedQuant | None:
    """The checkpoint's learned quantization parameters (validated against ``cfg``), or None if it has none."""
    path = Path(directory) / LEARNED_QUANT_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise MoecError(f"cannot read {LEARNED_QUANT_FILE}: corrupt or truncated safetensors ({exc})") from None
    if meta.get("format") != FORMAT or not str(meta.get("group_size", "")).isdigit():
        raise MoecError(f"{path} is not a moec learned-quantization file (format {meta.get('format')!r})")
    params: dict[tuple[str, int], list] = {}
    for key, arr in raw.items():
        stem, _, part = key.rpartition(".")
        name, _, bits = stem.rpartition("@")
        if part not in ("scale", "zero") or not bits.isdigit():
            raise MoecError(f"{LEARNED_QUANT_FILE}: unexpected tensor '{key[:80]}'")
        want = np.float16 if part == "scale" else np.uint8
        if arr.dtype != want:
            raise MoecError(f"{LEARNED_QUANT_FILE}: '{key}' must be {np.dtype(want).name}, got {arr.dtype}")
        params.setdefault((name, int(bits)), [None, None])[0 if part == "scale" else 1] = arr
    for (name, bits), (scale, zero) in params.items():
        if scale is None or zero is None:
            raise MoecError(f"{LEARNED_QUANT_FILE}: '{name}@{bits}' lacks its {'scale' if scale is None else 'zero'}")
    lq = LearnedQuant(int(meta["group_size"]), {k: (v[0], v[1]) for k, v in params.items()},
                      meta.get("model_fingerprint", ""))
    if lq.model_fingerprint and lq.model_fingerprint != cfg.fingerprint():
        raise MoecError(f"{path} was learned for another model (fingerprint {lq.model_fingerprint[:12]}, "
                        f"this checkpoint is {cfg.fingerprint()[:12]})")
    return lq.validate(cfg, str(path))
