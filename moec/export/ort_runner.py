"""Run an export directory in onnxruntime: prefill, decode steps and greedy generation."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from moec.core.errors import MoecError


class OrtModel:
    """The prefill and decode sessions of an export directory (CPU execution provider)."""

    def __init__(self, export_dir: str | os.PathLike, threads: int | None = None, profile: bool = False,
                 graphs: tuple[str, ...] = ("prefill", "decode")) -> None:
        import onnxruntime as ort

        root = Path(export_dir)
        if not (root / "export.json").is_file():
            raise MoecError(f"'{root}' is not a moec export directory (no export.json)")
        self.summary = json.loads((root / "export.json").read_text())
        self.num_layers = self.summary["config"]["num_layers"]
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads is not None:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        if profile:
            opts.enable_profiling = True
            opts.profile_file_prefix = str(root / "ort_profile")
        self.sessions = {g: ort.InferenceSession(str(root / f"{g}.onnx"), opts, providers=["CPUExecutionProvider"])
                         for g in graphs}

    def _present(self, outs: list[np.ndarray]) -> list[np.ndarray]:
        return outs[1:1 + 2 * self.num_layers]

    def prefill(self, ids: list[int]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits ``[1, T, V]`` and the cache (key, value per layer)."""
        outs = self.sessions["prefill"].run(None, {"input_ids": np.array([ids], dtype=np.int64)})
        return outs[0], self._present(outs)

    def step(self, token: int, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One decode step: logits ``[1, 1, V]`` and the grown cache."""
        feed = {"input_ids": np.array([[token]], dtype=np.int64)}
        for i in range(self.num_layers):
            feed[f"past.{i}.key"], feed[f"past.{i}.value"] = past[2 * i], past[2 * i + 1]
        outs = self.sessions["decode"].run(None, feed)
        return outs[0], self._present(outs)

    def generate_greedy(self, prompt_ids: list[int], max_new_tokens: int, eos_id: int | None = None) -> list[int]:
        """Greedy decoding (same contract as ``MoEModel.generate_greedy``)."""
        logits, past = self.prefill(prompt_ids)
        out: list[int] = []
        for _ in range(max_new_tokens):
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            if eos_id is not None and nxt == eos_id:
                break
            logits, past = self.step(nxt, past)
        return out

    def end_profiling(self) -> dict[str, str]:
        return {g: s.end_profiling() for g, s in self.sessions.items()}
