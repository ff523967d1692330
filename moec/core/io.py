"""Atomic file writes: an output either appears whole or not at all."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from moec.core.errors import MoecError


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create the parent directory of an output file, with a one-line error if impossible."""
    parent = Path(path).resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MoecError(f"cannot create output directory '{parent}': {exc.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise MoecError(f"output directory '{parent}' is not writable")
    return parent


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    parent = ensure_writable_dir(path)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=".moec-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise MoecError(f"cannot write '{path}': {exc.strerror}") from None


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: str | os.PathLike, what: str = "file") -> dict:
    p = Path(path)
    if not p.is_file():
        raise MoecError(f"{what} '{p}' does not exist")
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MoecError(f"{what} '{p}' is not valid JSON: {exc}") from None
