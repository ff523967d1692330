"""Streaming ONNX export: a lazily read checkpoint packed layer by layer into the external-data file.

Each weight is quantized and packed as its layer is read and its initializer arrays are
appended to ``weights.bin`` at once (same alignment rules as ``writer.write_weights``); the
store keeps zero-byte placeholders, which is all the graph builders read (names, shapes,
dtypes). The graphs are then built, pointed at the file and checked with ``onnx.checker`` by
path (so models over 2 GB check too). Output is identical in layout to ``export_model``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from moec.artifact.weights_file import placeholder
from moec.core.errors import MoecError
from moec.export.exporter import ACCURACY_LEVELS, ExportResult, _summary
from moec.export.graph_builder import GRAPHS, build_model
from moec.export.onnx_graph import WeightStore
from moec.export.quantized_matmul import store_weight
from moec.quant.weights import ModelWeights
from moec.export.writer import _PAGE, _PAGE_FROM, _SMALL_ALIGN, SUMMARY_FILE, WEIGHTS_FILE, attach_weights, \
    write_export_dir, write_json
from moec.models.lazy import LazyCheckpoint
from moec.core.inventory import expert_key, non_expert_weights
from moec.core.plan import BitPlan
from moec.quant.packed_model import GPTQ, PackedWeight, pack_weight


class StreamingStore(WeightStore):
    """A WeightStore that writes each array to the external-data file when it is added."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._f = open(path, "wb")
        self.pos = 0
        self.offsets: dict[str, tuple[int, int]] = {}

    def add(self, name: str, array: np.ndarray) -> str:
        if name in self.arrays:
            raise ValueError(f"weight initializer '{name}' added twice")
        arr = np.ascontiguousarray(array)
        align = _PAGE if arr.nbytes >= _PAGE_FROM else _SMALL_ALIGN
        pad = -self.pos % align
        if pad:
            self._f.write(b"\0" * pad)
            self.pos += pad
        self._f.write(arr.reshape(-1).view(np.uint8).data)
        self.offsets[name] = (self.pos, arr.nbytes)
        self.pos += arr.nbytes
        self.arrays[name] = placeholder(arr.shape, arr.dtype)
        return name

    def close(self) -> None:
        self._f.close()


def _shape_only(pw: PackedWeight) -> PackedWeight:
    ph = [None if a is None else placeholder(a.shape, a.dtype) for a in (pw.packed, pw.scale, pw.zero, pw.super_scale)]
    return PackedWeight(pw.shape, pw.bits, pw.group_size, *ph[:3], pw.scales, ph[3])


def export_streaming(ckpt: LazyCheckpoint, plan: BitPlan, out: str | os.PathLike,
                     tokenizer: str | os.PathLike | None = None, source: str = "", accuracy_level: int = 0,
                     progress: bool = True) -> ExportResult:
    """Export ``ckpt`` under ``plan`` (validated by the caller) with one decoder layer resident."""
    if accuracy_level not in ACCURACY_LEVELS:
        raise MoecError(f"accuracy level {accuracy_level!r} not supported; choices: "
                        f"{', '.join(map(str, ACCURACY_LEVELS))}")
    if plan.method == GPTQ:
        raise MoecError("method gptq needs calibration Hessians, which the layer-streaming export does not "
                        "collect yet; use rtn, mse or hqq for checkpoints exported layer by layer")
    cfg = ckpt.cfg
    shapes = dict(non_expert_weights(cfg))

    def fill(tmp: Path) -> None:
        import onnx

        store = StreamingStore(tmp / WEIGHTS_FILE)
        stored, packed, floats, float_arrays = {}, {}, {}, {}

        def put(name: str, w, bits: int) -> None:
            pw = pack_weight(w, bits, plan.group_size, plan.method, scales=plan.scales)
            stored[name] = store_weight(store, name, pw, accuracy_level)
            packed[name] = _shape_only(pw)

        put("embed.weight", ckpt.tensor("embed.weight"), plan.tensor_bits("embed.weight"))
        ckpt.release()
        for i in tqdm(range(cfg.num_layers), desc="export", unit="layer", disable=not progress):
            state = ckpt.layer_state(i)
            for key in sorted(state):
                name = f"layers.{i}.{key}"
                if name in shapes:
                    put(name, state.pop(key), plan.tensor_bits(name))
                elif state[key].dim() == 1:
                    arr = state.pop(key).numpy()
                    floats[name] = store.add(name, arr)
                    float_arrays[name] = placeholder(arr.shape, arr.dtype)
            for e, bits in sorted(plan.experts.get(i, {}).items()):
                for proj in ("w1", "w3", "w2"):
                    put(expert_key(i, e, proj), state[f"mlp.{proj}"][e], bits)
            del state
            ckpt.release()
        if not cfg.tie_embeddings:
            put("lm_head.weight", ckpt.tensor("lm_head.weight"), plan.tensor_bits("lm_head.weight"))
        norm = ckpt.tensor("norm.weight").numpy()
        floats["norm.weight"] = store.add("norm.weight", norm)
        float_arrays["norm.weight"] = placeholder(norm.shape, norm.dtype)
        ckpt.release()
        store.close()
        meta = ModelWeights(cfg, plan, packed, float_arrays)
        for mode in GRAPHS:
            model = build_model(meta, stored, floats, store, mode, accuracy_level)
            attach_weights(model, store, store.offsets)
            path = tmp / f"{mode}.onnx"
            path.write_bytes(model.SerializeToString())
            onnx.checker.check_model(str(path))  # by path: works past the 2 GB protobuf limit
        summary = _summary(meta, source)
        summary["accuracy_level"] = accuracy_level
        summary["streamed"] = True
        if tokenizer is not None and Path(tokenizer).is_file():
            shutil.copyfile(tokenizer, tmp / "tokenizer.json")
        write_json(tmp / SUMMARY_FILE, summary)
        fill.summary = summary

    out_dir = write_export_dir(out, fill)
    files = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir())}
    return ExportResult(out_dir, files, fill.summary)
