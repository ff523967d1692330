"""Memory-mappable bundle weights: one flat file of 64-byte aligned arrays + a JSON index with a sha256 each.

``weights.bin`` holds every parameter back to back, each start aligned to 64 bytes (TVM's
allocation alignment, so a mapped array can be handed to TVM without a copy);
``weights.json`` gives, per name, ``offset``, ``nbytes``, ``dtype``, ``shape`` and the sha256
of those bytes (one chunk per tensor). The writer appends arrays as they are produced (a
layer at a time), so no stage ever holds the whole model's packed weights.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from pathlib import Path

import numpy as np

from moec.core.errors import MoecError

WEIGHTS_BIN = "weights.bin"
WEIGHTS_INDEX = "weights.json"
FORMAT = "moec-weights"
VERSION = 1
ALIGN = 64


def placeholder(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A read-only array of ``shape``/``dtype`` that occupies no memory (every element aliases one zero).

    Graph builders only read ``.shape``/``.dtype``/``.nbytes``; this lets them run after the
    values were streamed to disk.
    """
    return np.lib.stride_tricks.as_strided(np.zeros(1, dtype), shape=tuple(shape), strides=(0,) * len(shape),
                                           writeable=False)


class WeightsWriter:
    """Append arrays to ``DIR/weights.bin``; :meth:`close` writes ``DIR/weights.json``."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(directory)
        self._f = open(self.dir / WEIGHTS_BIN, "wb")
        self.pos = 0
        self.entries: dict[str, dict] = {}

    def append(self, name: str, arr: np.ndarray) -> dict:
        if name in self.entries:
            raise ValueError(f"weight '{name}' written twice")
        arr = np.ascontiguousarray(arr)
        pad = -self.pos % ALIGN
        if pad:
            self._f.write(b"\0" * pad)
            self.pos += pad
        data = arr.reshape(-1).view(np.uint8).data if arr.size else b""
        self._f.write(data)
        entry = {"offset": self.pos, "nbytes": arr.nbytes, "dtype": str(arr.dtype), "shape": list(arr.shape),
                 "sha256": hashlib.sha256(data).hexdigest()}
        self.entries[name] = entry
        self.pos += arr.nbytes
        return entry

    def close(self, order: list[str] | None = None) -> Path:
        """Finish the file; ``order`` (the parameter order) is recorded and must name every tensor."""
        self._f.close()
        if order is not None and sorted(order) != sorted(self.entries):
            missing = sorted(set(order) - set(self.entries))[:3]
            raise MoecError(f"weights file lacks parameter(s) {', '.join(missing) or '?'}")
        index = {"format": FORMAT, "version": VERSION, "alignment": ALIGN, "file": WEIGHTS_BIN,
                 "bytes": self.pos, "order": order or list(self.entries), "tensors": self.entries}
        path = self.dir / WEIGHTS_INDEX
        path.write_text(json.dumps(index) + "\n")
        return path

    def __enter__(self) -> "WeightsWriter":
        return self

    def __exit__(self, *exc) -> None:
        if not self._f.closed:
            self._f.close()


def write_arrays(directory: str | os.PathLike, arrays: list[tuple[str, np.ndarray]]) -> dict[str, Path]:
    """Write ``arrays`` (name, array) in order; returns the bundle files {name: path}."""
    with WeightsWriter(directory) as w:
        for name, arr in arrays:
            w.append(name, arr)
        w.close([n for n, _ in arrays])
    return {WEIGHTS_BIN: Path(directory) / WEIGHTS_BIN, WEIGHTS_INDEX: Path(directory) / WEIGHTS_INDEX}


class WeightsReader:
    """A mapped ``weights.bin``: :meth:`array` returns views into the mapping, never copies.

    The mapping is private copy-on-write, so arrays are writable numpy views (TVM's DLPack import
    accepts them) while the file is never modified and untouched pages stay file-backed.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        root = Path(directory)
        idx = root / WEIGHTS_INDEX
        if not idx.is_file():
            raise MoecError(f"'{root}' has no {WEIGHTS_INDEX}")
        try:
            self.index = json.loads(idx.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise MoecError(f"'{idx}' is not valid JSON") from None
        if self.index.get("format") != FORMAT or self.index.get("version") != VERSION:
            raise MoecError(f"'{idx}' is weights format {self.index.get('format')!r} version "
                            f"{self.index.get('version')!r}; this moec reads {FORMAT} version {VERSION}")
        path = root / self.index["file"]
        size = path.stat().st_size if path.is_file() else -1
        if size != self.index["bytes"]:
            raise MoecError(f"'{path}' has {size} bytes but {WEIGHTS_INDEX} says {self.index['bytes']}")
        with open(path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
        self.tensors: dict[str, dict] = self.index["tensors"]
        self.order: list[str] = self.index["order"]

    def array(self, name: str, verify: bool = False) -> np.ndarray:
        e = self.tensors.get(name)
        if e is None:
            raise MoecError(f"weights file has no tensor '{name}'")
        dt = np.dtype(e["dtype"])
        count = e["nbytes"] // dt.itemsize
        arr = (np.frombuffer(self._mm, dtype=dt, count=count, offset=e["offset"]) if count
               else np.zeros(0, dt)).reshape(e["shape"])
        if verify and hashlib.sha256(arr.reshape(-1).view(np.uint8).data if count else b"").hexdigest() != e["sha256"]:
            raise MoecError(f"weights tensor '{name}' does not match its sha256 in {WEIGHTS_INDEX} (corrupt)")
        return arr

    def release(self) -> None:
        """Drop the mapped pages from this process' resident set (they are re-read if used again)."""
        if self._mm is not None:
            self._mm.madvise(mmap.MADV_DONTNEED)


def device_params(bundle: str | os.PathLike, names: list[str], dev, zero_copy: bool = True) -> list:
    """TVM tensors of ``names`` from a bundle's mapped weights, one tensor at a time.

    On the local CPU each tensor wraps its mapped bytes through DLPack (no copy; 64-byte
    alignment makes this legal); otherwise (a remote device, or DLPack refused) each tensor is
    copied on its own and the mapped pages are dropped after it, so the host never holds the
    whole model twice and an RPC device receives the weights tensor by tensor.
    """
    import tvm.runtime

    reader = WeightsReader(bundle)
    out = []
    for name in names:
        arr = reader.array(name)
        if zero_copy and arr.size:
            try:
                out.append(tvm.runtime.from_dlpack(arr))
                continue
            except Exception:  # TVM refuses some buffers (alignment, dtype): copy this one
                pass
        out.append(tvm.runtime.tensor(arr, dev))
        if not zero_copy:
            reader.release()
    return out
