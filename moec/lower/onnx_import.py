"""Import a moec-exported ONNX model for the TVM back end: plan, config and packed weights from the file.

TVM 0.27's ONNX frontend has no converter for ``com.microsoft.MatMulNBits``, rejects blocked
``DequantizeLinear`` and cannot keep weights packed through ``If``-guarded expert branches.
moec therefore imports its own exports structurally: the ``moec.config`` and ``moec.plan``
model metadata give the architecture and every expert's bits, and each weight's
initializers (``NAME.qweight`` / ``NAME.scales`` / ``NAME.qzeros`` in the MatMulNBits or
packed form, or ``NAME`` as float) are read back into moec's packed layout, bit-exactly —
the MatMulNBits ``B`` tensor *is* moec's LSB-first layout reshaped. The Relax graph is then
built by ``decode_graph.py`` with per-bit-class expert stacks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from moec.core.errors import MoecError
from moec.core.config import MoEConfig
from moec.quant.pack import packed_row_bytes
from moec.core.inventory import EXPERT_BIASES, HEAD_WEIGHTS, expert_key, expert_shapes, non_expert_weights
from moec.quant.packed_model import PackedWeight
from moec.core.plan import BitPlan


def _resolve(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / "decode.onnx"
    if not p.is_file():
        raise MoecError(f"ONNX model '{path}' does not exist")
    return p


def _load(path: Path):
    import onnx
    from onnx import numpy_helper
    try:
        model = onnx.load(str(path), load_external_data=True)
    except Exception as exc:  # onnx raises DecodeError/OSError/ValidationError variants
        raise MoecError(f"cannot read ONNX model '{path}': {str(exc).strip().splitlines()[0]}") from None
    meta = {p.key: p.value for p in model.metadata_props}
    if "moec.plan" not in meta or "moec.config" not in meta:
        raise MoecError(f"'{path}' was not exported by moec (no moec.plan/moec.config metadata)")
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return meta, inits


def _packed(name: str, bits: int, shape: tuple[int, int], group: int, inits: dict) -> PackedWeight:
    n, k = shape
    if f"{name}.qweight" in inits:
        g = k // group
        data = inits[f"{name}.qweight"].reshape(n, packed_row_bytes(k, bits))
        scale = inits[f"{name}.scales"].reshape(n, g).astype(np.float16)
        zero = inits[f"{name}.qzeros"].reshape(n, packed_row_bytes(g, bits))
        return PackedWeight(shape, bits, group, np.ascontiguousarray(data, np.uint8), scale,
                            np.ascontiguousarray(zero, np.uint8))
    if name in inits:
        return PackedWeight(shape, 16, group, np.ascontiguousarray(inits[name]).reshape(n, k))
    raise MoecError(f"ONNX model lacks the initializers of weight '{name}'")


def import_onnx(path: str | os.PathLike) -> tuple[MoEConfig, BitPlan, dict[str, PackedWeight], dict[str, np.ndarray]]:
    """(config, plan, packed weights by canonical name, float 1-D tensors) of a moec ONNX export."""
    file = _resolve(path)
    meta, inits = _load(file)
    try:
        cfg = MoEConfig(**json.loads(meta["moec.config"]))
        plan = BitPlan.from_json(json.loads(meta["moec.plan"]), source=f"plan in '{file.name}'")
    except (TypeError, json.JSONDecodeError) as exc:
        raise MoecError(f"'{file}' has malformed moec metadata: {exc}") from None
    plan.validate(cfg)
    if plan.scales != "fp16":
        raise MoecError(f"'{file.name}' holds a plan with '{plan.scales}' scales, exported as dequantized float32 "
                        "scales: the codes cannot be rebuilt from it; compile the checkpoint with `moec compile`")
    packed: dict[str, PackedWeight] = {}
    for name, shape in non_expert_weights(cfg):
        packed[name] = _packed(name, plan.tensor_bits(name), shape, plan.group_size, inits)
    shapes = expert_shapes(cfg)
    for layer, experts in plan.experts.items():
        for e, bits in experts.items():
            if not plan.is_stored(layer, e):
                continue  # not exported (dropped, or merged into another expert)
            for proj, shape in shapes.items():
                key = expert_key(layer, e, proj)
                packed[key] = _packed(key, bits, shape, plan.group_size, inits)
    floats = {n: a.astype(np.float32) for n, a in inits.items() if n not in packed and (
              (a.ndim == 1 and n.endswith((".weight", ".bias", ".score_bias", ".sinks"))) or
              (a.ndim == 3 and n.endswith(HEAD_WEIGHTS)) or (a.ndim == 2 and n.endswith(EXPERT_BIASES)))}
    return cfg, plan, packed, floats
