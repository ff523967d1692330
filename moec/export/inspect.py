"""``moec inspect``'s dispatch: an ONNX export or a bundle directory.

Its imports are light (onnx, the bundle reader; no TVM compiler), so a device with the TVM runtime alone can
inspect and verify the bundles it runs.
"""

from __future__ import annotations

import os
from pathlib import Path

from moec.artifact.inspect_bundle import inspect_bundle
from moec.core.errors import MoecError
from moec.export.inspect_onnx import inspect_onnx


def inspect_file(path: str | os.PathLike):
    """Inspect an artifact by type: ``.onnx`` -> ``OnnxInspection``; a bundle directory -> its manifest."""
    if Path(path).suffix.lower() == ".onnx":
        return inspect_onnx(path)
    if Path(path).is_dir() and (Path(path) / "manifest.json").is_file():
        return inspect_bundle(path)
    raise MoecError(f"unsupported file '{path}'; expected a .onnx model or a bundle directory")
