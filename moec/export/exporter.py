"""Export orchestration: model + plan -> DIR/{prefill,decode}.onnx, weights.bin, tokenizer.json, export.json."""

from __future__ import annotations

import logging
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moec.core.errors import MoecError
from moec.core.plan import BitPlan
from moec.export.graph_builder import GRAPHS, IR_VERSION, build_graphs
from moec.export.onnx_graph import OPSET
from moec.export.quantized_matmul import choose_form
from moec.export.writer import SUMMARY_FILE, WEIGHTS_FILE, attach_weights, write_export_dir, write_json, write_weights
from moec.models.model import MoEModel
from moec.quant.packed_model import fake_quantize_model
from moec.quant.weights import ModelWeights

log = logging.getLogger("moec.export")
FORMAT = "moec-onnx"
FORMAT_VERSION = 1
ACCURACY_LEVELS = (0, 1, 2, 3, 4)


@dataclass
class ExportResult:
    """What an export wrote: the directory, file sizes and the summary also saved as export.json."""

    out_dir: Path
    files: dict[str, int]
    summary: dict
    max_abs_diff: float | None = None


def export_weights(weights: ModelWeights, out: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                   source: str = "", accuracy_level: int = 0) -> ExportResult:
    """Build both graphs for ``weights`` and write them with the shared weights file into ``out``.

    ``accuracy_level``: MatMulNBits' (0 = float32 compute, matches the torch fake-quant model to
    ~1e-6; 4 = int8 activations, faster on CPU, ~1e-2 relative error).
    """
    if accuracy_level not in ACCURACY_LEVELS:
        raise MoecError(f"accuracy level {accuracy_level!r} not supported; choices: "
                        f"{', '.join(map(str, ACCURACY_LEVELS))}")
    log.info("building ONNX graphs")
    graphs = build_graphs(weights, accuracy_level)
    summary = _summary(weights, source)
    summary["accuracy_level"] = accuracy_level

    def fill(tmp: Path) -> None:
        log.info("writing %s (%.1f MB)", WEIGHTS_FILE, graphs.store.nbytes / 1e6)
        offsets = write_weights(graphs.store, tmp / WEIGHTS_FILE)
        for mode in GRAPHS:
            model = attach_weights(getattr(graphs, mode), graphs.store, offsets)
            (tmp / f"{mode}.onnx").write_bytes(model.SerializeToString())
        if tokenizer is not None and Path(tokenizer).is_file():
            shutil.copyfile(tokenizer, tmp / "tokenizer.json")
        write_json(tmp / SUMMARY_FILE, summary)

    out_dir = write_export_dir(out, fill)
    files = {p.name: p.stat().st_size for p in sorted(out_dir.iterdir())}
    return ExportResult(out_dir, files, summary)


def export_model(model: MoEModel, plan: BitPlan, out: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                 source: str = "", verify: bool = False, accuracy_level: int = 0) -> ExportResult:
    """Quantize ``model`` under ``plan`` (validated by the caller) and export it.

    With ``verify``, a 16-token prompt runs through the exported prefill graph in onnxruntime and
    through the torch model fake-quantized to the same plan; ``max_abs_diff`` is the largest logit
    difference (``model`` is fake-quantized in place).
    """
    res = export_weights(ModelWeights.from_model(model, plan), out, tokenizer, source, accuracy_level)
    if verify:
        res.max_abs_diff = verify_export(model, plan, res.out_dir)
    return res


def verify_export(model: MoEModel, plan: BitPlan, out_dir: Path, prompt_len: int = 16) -> float:
    import torch

    from moec.export.ort_runner import OrtModel  # local: onnxruntime loads only when verifying

    ids = [(7 * i + 3) % model.cfg.vocab_size for i in range(prompt_len)]
    onnx_logits, _ = OrtModel(out_dir, graphs=("prefill",)).prefill(ids)
    fake_quantize_model(model, plan)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).numpy()
    return float(np.abs(onnx_logits - ref).max())


def _summary(weights: ModelWeights, source: str) -> dict:
    cfg, plan = weights.cfg, weights.plan
    expert_bits = Counter(b for layer, experts in plan.experts.items() for e, b in experts.items()
                          if plan.is_stored(layer, e))
    forms = {str(pw.bits): choose_form(pw) for pw in weights.packed.values()}
    expert_bytes = sum(pw.nbytes for n, pw in weights.packed.items() if ".experts." in n)
    other_bytes = sum(pw.nbytes for n, pw in weights.packed.items() if ".experts." not in n)
    (kv, hd), (vh, vd) = cfg.kv_cache_shapes()
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "source": source,
        "opset": OPSET, "ir_version": IR_VERSION, "weights_file": WEIGHTS_FILE,
        "graphs": {
            "prefill": {"file": "prefill.onnx", "inputs": {"input_ids": [1, "T"]},
                        "outputs": {"logits": [1, "T", cfg.vocab_size], "present.{i}.key": [1, kv, "T", hd],
                                    "present.{i}.value": [1, vh, "T", vd]}},
            "decode": {"file": "decode.onnx", "inputs": {"input_ids": [1, 1], "past.{i}.key": [1, kv, "P", hd],
                                                         "past.{i}.value": [1, vh, "P", vd]},
                       "outputs": {"logits": [1, 1, cfg.vocab_size], "present.{i}.key": [1, kv, "P+1", hd],
                                   "present.{i}.value": [1, vh, "P+1", vd]},
                       "position": "P, the past length (shape of past.0.key)"},
        },
        "config": cfg.to_dict(), "fingerprint": cfg.fingerprint(), "plan": plan.to_json(),
        "average_expert_bits": plan.average_expert_bits(cfg),
        "experts_per_bits": {str(b): n for b, n in sorted(expert_bits.items())},
        "forms": dict(sorted(forms.items(), key=lambda kv_: int(kv_[0]))),
        "bytes": {"experts": expert_bytes, "non_expert": other_bytes,
                  "norms_bias": sum(a.nbytes for a in weights.floats.values())},
    }
