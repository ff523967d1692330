"""Verified stamps: a record that a bundle's files were fully hashed, so a later load may skip unchanged ones.

Opt-in only (``moec run --trust-verified``, ``BundleSession(trust_verified=True)``). After a full
verification the stamp records, per listed file, ``(size, mtime_ns, ctime_ns, inode, device)``;
a later load with ``trust_verified`` re-hashes every file whose identity differs and skips the
rest. Everything else is checked on every load as before: the manifest (schema, signature with
``--trust``), nothing unlisted or missing, no links, sizes; ``lib.so`` is hashed again on its
private copy whatever the stamp says.

What it does not protect against: the inode change time (``ctime``) cannot be set by a process,
only by changing the system clock, so a file rewritten in place — even with its mtime restored —
is re-hashed; but someone able to change the clock (root), or to write into the stamp directory
(``MOEC_VERIFIED_DIR``, default ``$XDG_CACHE_HOME/moec/verified`` or ``~/.cache/moec/verified``),
can make a modified file look verified. Use it for your own bundles on your own machine.

A stamp is named by the sha256 of the bundle's real path and its manifest bytes: another
manifest (a rebuilt or edited bundle) never matches an old stamp.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from moec.core.errors import MoecError
from moec.core.io import atomic_write_text

VERSION = 1


def stamp_dir() -> Path:
    env = os.environ.get("MOEC_VERIFIED_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "moec" / "verified"


def identity(path: Path) -> list[int]:
    """``[size, mtime_ns, ctime_ns, inode, device]`` of ``path`` (not following links)."""
    st = os.lstat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _stamp_path(root: Path, manifest_bytes: bytes) -> Path:
    h = hashlib.sha256(os.fsencode(os.path.realpath(root)) + b"\0" + hashlib.sha256(manifest_bytes).digest())
    return stamp_dir() / f"{h.hexdigest()}.json"


def read_stamp(root: Path, manifest_bytes: bytes) -> dict[str, list[int]]:
    """{file: identity} recorded for this bundle and manifest; empty when there is none (or it is unreadable)."""
    try:
        data = json.loads(_stamp_path(root, manifest_bytes).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    files = data.get("files") if isinstance(data, dict) and data.get("version") == VERSION else None
    if not isinstance(files, dict):
        return {}
    return {k: v for k, v in files.items() if isinstance(v, list) and len(v) == 5}


def write_stamp(root: Path, manifest_bytes: bytes, files: dict[str, list[int]]) -> None:
    """Record ``files`` (identities taken before they were hashed) as verified; failures are ignored."""
    path = _stamp_path(root, manifest_bytes)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write_text(path, json.dumps({"version": VERSION, "bundle": os.path.realpath(root),
                                            "files": files}) + "\n")
    except (OSError, MoecError):
        pass
