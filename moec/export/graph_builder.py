"""Whole-model ONNX graphs: the prefill graph and the single-token decode graph of an MoEModel under a plan.

The layers are ``moec.arch.blocks`` emitted through :class:`~moec.export.onnx_ops.OnnxOps`.

Graph interfaces (batch 1, float32 activations):

prefill
    inputs ``input_ids`` int64 ``[1, T]``; outputs ``logits`` float ``[1, T, V]`` and, per layer ``i``,
    ``present.i.key`` / ``present.i.value`` float ``[1, kv_heads, T, head_dim]`` (the widths of
    ``MoEConfig.kv_cache_shapes``: MLA caches one latent "head", key ``[c, k_rope]``, value ``c``).
decode
    inputs ``input_ids`` int64 ``[1, 1]`` and ``past.i.key`` / ``past.i.value``
    ``[1, kv_heads, P, head_dim]``; the token's position is the past length ``P``, read from the
    shape of ``past.0.key`` (so position and cache cannot disagree); outputs ``logits`` ``[1, 1, V]``
    and ``present.i.key`` / ``present.i.value`` ``[1, kv_heads, P + 1, head_dim]``.

Both graphs read the same weight initializers (written once, see ``writer.py``). The model's
``metadata_props`` carry ``moec.plan`` (the plan JSON), ``moec.config`` (MoEConfig JSON),
``moec.graph`` (prefill/decode), ``moec.fingerprint`` and ``moec.accuracy_level``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from onnx import ModelProto, helper

from moec.arch import blocks
from moec.export.onnx_graph import FLOAT, INT64, MS_DOMAIN, MS_OPSET, OPSET, GraphBuilder, WeightStore, tensor_info
from moec.export.onnx_ops import OnnxOps, positions
from moec.export.quantized_matmul import StoredWeight, store_weight
from moec.quant.weights import ModelWeights

IR_VERSION = 10  # first IR with NodeProto.metadata_props
GRAPHS = ("prefill", "decode")


@dataclass
class ExportGraphs:
    """The two graphs (weights not attached) and the weight arrays they share."""

    prefill: ModelProto
    decode: ModelProto
    store: WeightStore
    stored: dict[str, StoredWeight]


def build_graphs(weights: ModelWeights, accuracy_level: int = 0) -> ExportGraphs:
    """Prefill and decode graphs for ``weights`` (a model packed under its plan).

    ``accuracy_level`` is MatMulNBits' attribute (0 = float32 compute, exact; 4 = int8 activations).
    """
    store = WeightStore()
    stored = {name: store_weight(store, name, pw, accuracy_level) for name, pw in weights.packed.items()}
    floats = {name: store.add(name, arr) for name, arr in weights.floats.items()}
    graphs = {mode: build_model(weights, stored, floats, store, mode, accuracy_level) for mode in GRAPHS}
    return ExportGraphs(graphs["prefill"], graphs["decode"], store, stored)


def build_model(weights: ModelWeights, w: dict[str, StoredWeight], floats: dict[str, str], store: WeightStore,
                mode: str, accuracy_level: int = 0) -> ModelProto:
    cfg = weights.cfg
    decode = mode == "decode"
    gb = GraphBuilder(store)
    (kh, kd), (vh, vd) = cfg.kv_cache_shapes()  # MLA: the latent (+ RoPE key part), one "head"
    inputs = [tensor_info("input_ids", INT64, [1, 1] if decode else [1, "seq_len"])]
    if decode:
        for i in range(cfg.num_layers):
            inputs += [tensor_info(f"past.{i}.key", FLOAT, [1, kh, "past_len", kd]),
                       tensor_info(f"past.{i}.value", FLOAT, [1, vh, "past_len", vd])]
    ids = gb.op("Reshape", ["input_ids", gb.i64(-1)])
    seq_len = gb.op("Gather", [gb.op("Shape", [ids]), gb.scalar_i64(0)], axis=0)
    past = gb.op("Gather", [gb.op("Shape", ["past.0.key"]), gb.scalar_i64(2)], axis=0) if decode else None
    pos = positions(gb, cfg, seq_len, past, causal=not decode)
    logits = blocks.causal_lm(OnnxOps(gb, cfg, w, floats, pos, decode, weights.plan), cfg, ids)
    gb.op("Unsqueeze", [logits, gb.i64(0)], outputs=["logits"])
    seq = 1 if decode else "seq_len"
    total = "total_len" if decode else "seq_len"
    outputs = [tensor_info("logits", FLOAT, [1, seq, cfg.vocab_size])]
    for i in range(cfg.num_layers):
        for kv, (heads, width) in (("key", (kh, kd)), ("value", (vh, vd))):
            outputs.append(tensor_info(f"present.{i}.{kv}", FLOAT, [1, heads, total, width]))
    graph = gb.to_graph(f"moec_{mode}", inputs, outputs, initializers=gb.const_tensors)
    model = helper.make_model(graph, producer_name="moec", ir_version=IR_VERSION,
                              opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, MS_OPSET)])
    helper.set_model_props(model, {
        "moec.plan": json.dumps(weights.plan.to_json()),  # key order matters: first match wins
        "moec.config": json.dumps(cfg.to_dict(), sort_keys=True),
        "moec.graph": mode,
        "moec.fingerprint": cfg.fingerprint(),
        "moec.accuracy_level": str(accuracy_level),
    })
    return model
