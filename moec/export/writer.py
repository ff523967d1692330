"""Write an export directory atomically: both graphs share one external weights file, written once.

``DIR/weights.bin`` holds every weight initializer (packed codes, scales, zeros, float16/float32
tensors, norms) back to back (each start aligned to 64 bytes, large tensors to 4096 so
onnxruntime can map them); ``prefill.onnx`` and ``decode.onnx`` reference it through ONNX
external-data entries (location, offset, length). The directory is assembled in a temporary
sibling and renamed into place at the end, so a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from onnx import ModelProto, TensorProto, helper

from moec.core.errors import MoecError
from moec.export.onnx_graph import WeightStore

WEIGHTS_FILE = "weights.bin"
SUMMARY_FILE = "export.json"
_PAGE, _SMALL_ALIGN, _PAGE_FROM = 4096, 64, 1 << 16


def write_weights(store: WeightStore, path: Path) -> dict[str, tuple[int, int]]:
    """Write every array of ``store`` to ``path``; returns name -> (offset, length)."""
    offsets: dict[str, tuple[int, int]] = {}
    with open(path, "wb") as f:
        pos = 0
        for name, arr in store.arrays.items():
            align = _PAGE if arr.nbytes >= _PAGE_FROM else _SMALL_ALIGN
            pad = -pos % align
            if pad:
                f.write(b"\0" * pad)
                pos += pad
            f.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)
            offsets[name] = (pos, arr.nbytes)
            pos += arr.nbytes
    return offsets


def external_tensor(name: str, arr: np.ndarray, location: str, offset: int, length: int) -> TensorProto:
    t = TensorProto()
    t.name = name
    t.data_type = helper.np_dtype_to_tensor_dtype(arr.dtype)
    t.dims.extend(arr.shape)
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def attach_weights(model: ModelProto, store: WeightStore, offsets: dict[str, tuple[int, int]],
                   location: str = WEIGHTS_FILE) -> ModelProto:
    """Add external-data initializers for every stored weight to ``model`` (in place)."""
    model.graph.initializer.extend(external_tensor(n, store.arrays[n], location, *offsets[n]) for n in store.arrays)
    return model


def check_export_target(out: str | os.PathLike) -> Path:
    """Absolute ``out`` after checking it can be (re)written; creates its parent. Raises MoecError."""
    out = Path(out).absolute()
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / SUMMARY_FILE).is_file())):
        raise MoecError(f"'{out}' exists and is not a moec export directory; refusing to overwrite it")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MoecError(f"cannot create output directory '{parent}': {exc.strerror or exc}") from None
    if not os.access(parent, os.W_OK):
        raise MoecError(f"output directory '{parent}' is not writable")
    return out


def write_export_dir(out: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Create directory ``out`` by calling ``fill(tmp_dir)`` and renaming ``tmp_dir`` into place.

    An existing ``out`` is replaced only if it is empty or a previous export (has ``export.json``).

    Raises
    ------
    MoecError
        If the parent cannot be created or written, ``out`` is something else, or writing fails;
        no partial output is left in either case.
    """
    out = check_export_target(out)
    parent = out.parent
    try:
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out.name}.tmp-"))
    except OSError as exc:
        raise MoecError(f"cannot write into '{parent}': {exc.strerror or exc}") from None
    try:
        fill(tmp)
        tmp.chmod(0o755)
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out.name}.old-"))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as exc:
        raise MoecError(f"cannot write export to '{out}': {exc.strerror or exc}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
