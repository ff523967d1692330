"""Bundle writer and verifying reader (no TVM import: the device side uses this too).

A bundle is a directory::

    manifest.json   format, model config + fingerprint, plan, target, versions, creation
                    command, entry points, parameter order, and {file: sha256, bytes}
    lib.so          compiled module (cross-compiled for the target)
    weights.bin     packed weights, scales, zeros and float tensors, 64-byte aligned, memory-mappable
    weights.json    their index: offset, dtype, shape and sha256 per tensor (``weights_file.py``)
    tokenizer.json

The reader recomputes every file's sha256 and refuses the bundle on any mismatch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from moec.errors import MoecError

FORMAT = "moec-bundle"
FORMAT_VERSION = 2  # 2: weights.bin + weights.json replace weights.npz


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_bundle(out: str | os.PathLike, files: dict[str, str | os.PathLike], manifest: dict,
                 move: tuple[str, ...] = ()) -> Path:
    """Copy ``files`` (bundle name → source path) into ``out`` with a manifest, atomically.

    Names in ``move`` are moved instead of copied (large temporary files on the same file system).

    The bundle is assembled in a temporary sibling directory and renamed into place, so a
    failure never leaves a half-written bundle; an existing bundle at ``out`` is replaced.
    """
    out = Path(out).resolve()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    except OSError as exc:
        raise MoecError(f"cannot create bundle directory '{out}': {exc.strerror}") from None
    try:
        entries = {}
        for name, src in files.items():
            if name in move:
                shutil.move(src, tmp / name)
            else:
                shutil.copyfile(src, tmp / name)
            entries[name] = {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
        full = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "files": entries}
        (tmp / "manifest.json").write_text(json.dumps(full, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.chmod(0o755)
        os.replace(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise MoecError(f"cannot write bundle '{out}': {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_manifest(bundle: str | os.PathLike, verify: bool = True) -> dict:
    """The bundle's manifest; with ``verify`` every listed file's sha256 is checked."""
    root = Path(bundle)
    if not root.is_dir():
        raise MoecError(f"bundle '{root}' does not exist or is not a directory")
    mf = root / "manifest.json"
    if not mf.is_file():
        raise MoecError(f"'{root}' is not a moec bundle (no manifest.json)")
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise MoecError(f"bundle manifest '{mf}' is not valid JSON") from None
    if manifest.get("format") != FORMAT:
        raise MoecError(f"'{root}' is not a moec bundle (format {manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        old = " (weights.npz)" if manifest.get("format_version") == 1 else ""
        raise MoecError(f"bundle format version {manifest.get('format_version')}{old} is not supported "
                        f"(this moec reads {FORMAT_VERSION}); rebuild it with moec compile or moec build")
    if verify:
        for name, entry in manifest.get("files", {}).items():
            f = root / name
            if not f.is_file():
                raise MoecError(f"bundle file '{name}' is missing")
            if sha256_file(f) != entry["sha256"]:
                raise MoecError(f"bundle file '{name}' does not match its sha256 in manifest.json "
                                "(tampered or corrupt); refusing to load")
    return manifest
