"""The export stage from files: checkpoint + plan → ONNX directory."""

from __future__ import annotations

import os
from pathlib import Path

from moec.models.knobs import STREAMED_WHY, require_no_knobs
from moec.core.errors import MoecError
from moec.core.plan import UNIFORM_METHOD, resolve_plan
from moec.export.exporter import ExportResult, export_model
from moec.export.stream_export import export_streaming
from moec.export.writer import check_export_target
from moec.models.checkpoint import load_checkpoint, load_config
from moec.pipeline.profile import memory_plan_of
from moec.quant.padding import pad_for_groups


def export_onnx(checkpoint: str | os.PathLike, plan: str | os.PathLike, out: str | os.PathLike,
                group_size: int = 64, method: str | None = None, verify: bool = False,
                accuracy_level: int = 0, max_memory_gb: float | None = None,
                scales: str | None = None) -> ExportResult:
    """Export ``checkpoint`` under ``plan`` (file or ``uniform:B``) to ONNX in directory ``out``.

    Writes ``prefill.onnx``, ``decode.onnx``, ``weights.bin``, ``tokenizer.json`` and ``export.json``
    atomically. ``group_size``/``method`` apply to ``uniform:B`` plans. Returns an
    ``ExportResult`` (with ``max_abs_diff`` against the fake-quantized torch model when ``verify``).
    """
    bit_plan = resolve_plan(plan, load_config(checkpoint), group_size, method or UNIFORM_METHOD, pad_ok=True,
                            scales=scales)
    check_export_target(out)  # fail before the (slow) load and quantization
    ckpt, mem = memory_plan_of(checkpoint, max_memory_gb, "export")
    if mem.sequential:
        require_no_knobs(bit_plan, "streamed ONNX export (model over the memory budget)", STREAMED_WHY)
        if verify:
            raise MoecError("--verify compares against the whole torch model, which exceeds the memory budget; "
                            "drop --verify (the streamed export is checked by onnx.checker)")
        return export_streaming(ckpt, bit_plan, out, Path(checkpoint) / "tokenizer.json", str(checkpoint),
                                accuracy_level)
    model, bit_plan = pad_for_groups(load_checkpoint(checkpoint), bit_plan)
    return export_model(model, bit_plan, out, tokenizer=Path(checkpoint) / "tokenizer.json",
                        source=str(checkpoint), verify=verify, accuracy_level=accuracy_level)


