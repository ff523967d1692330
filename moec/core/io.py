"""Atomic file writes: an output either appears whole or not at all."""

from __future__ import annotations

import json
import math
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


MAX_JSON_BYTES = 64 << 20
MAX_JSON_DEPTH = 32


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _depth(obj, limit: int) -> int:
    """Nesting depth of ``obj`` (iterative, so deep input cannot exhaust the stack here)."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (dict, list)):
            if d > limit:
                return d
            deepest = max(deepest, d)
            stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return deepest


def loads_strict(text: str | bytes, what: str, max_depth: int = MAX_JSON_DEPTH) -> object:
    """Parse JSON refusing duplicate keys, NaN/Infinity, huge numbers and nesting deeper than ``max_depth``."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise MoecError(f"{what} is not UTF-8 text") from None
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant,
                         parse_int=_bounded_int, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise MoecError(f"{what} is not valid JSON: {exc}") from None
    except (ValueError, RecursionError) as exc:
        raise MoecError(f"{what} is not acceptable JSON: {exc}") from None
    if _depth(obj, max_depth) > max_depth:
        raise MoecError(f"{what} is nested deeper than {max_depth} levels")
    return obj


def _finite_float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v):
        raise ValueError(f"number {s[:20]} overflows")
    return v


def _bounded_int(s: str) -> int:
    if len(s.lstrip("-")) > 30:
        raise ValueError(f"integer with {len(s)} digits")
    return int(s)


def read_json_strict(path: str | os.PathLike, what: str = "file", max_bytes: int = MAX_JSON_BYTES) -> object:
    """``loads_strict`` of a file, refusing files over ``max_bytes`` and things that are not files."""
    p = Path(path)
    if not p.is_file():
        raise MoecError(f"{what} '{p}' does not exist or is not a file")
    try:
        with open(p, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise MoecError(f"cannot read {what} '{p}': {exc.strerror or exc}") from None
    if len(data) > max_bytes:
        raise MoecError(f"{what} '{p}' is larger than {max_bytes >> 20} MiB")
    return loads_strict(data, f"{what} '{p}'")
