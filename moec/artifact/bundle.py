"""Bundle writer and strict verifying reader (no TVM import: the device side uses this too).

A bundle is a directory::

    manifest.json   format, model config + fingerprint, plan, target, versions, creation
                    command, entry points, parameter order, and {file: sha256, bytes}
    manifest.sig    optional Ed25519 signature of manifest.json (moec compile/build --sign KEY)
    lib.so          compiled module (cross-compiled for the target)
    weights.bin     packed weights, scales, zeros and float tensors, 64-byte aligned, memory-mappable
    weights.json    their index: offset, dtype, shape and sha256 per tensor (``weights_file.py``)
    tokenizer.json

Verification (``verify_bundle``) is all-or-nothing and happens before any file is used: the
manifest must match a strict schema, every regular file in the directory must be listed
(nothing unlisted, nothing missing, no symbolic links or special files, no name that leaves
the directory), every listed file must have its size and sha256, and with a trusted public
key the signature must verify. Only then may ``lib.so`` be loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path, PurePosixPath

from moec.artifact.manifest_schema import FORMAT, FORMAT_VERSION, check_manifest, check_name
from moec.artifact.signing import SIGNATURE_FILE, sign, verify
from moec.artifact.verified_stamp import identity, read_stamp, write_stamp
from moec.core.errors import MoecError
from moec.core.io import loads_strict
from moec.core.outputs import check_output_dir, reclaim_stale, replace_dir, staging_prefix

MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20
__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "sha256_file", "write_bundle", "read_manifest",
           "verify_bundle", "verified_copy"]


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_bundle(out: str | os.PathLike, files: dict[str, str | os.PathLike], manifest: dict,
                 force: bool = False, sign_key: str | os.PathLike | None = None,
                 move: tuple[str, ...] = ()) -> Path:
    """Copy ``files`` (bundle name → source path) into ``out`` with a manifest, atomically.

    Names in ``move`` are moved instead of copied (large temporary files on the same file system).

    The bundle is assembled in a temporary sibling directory and renamed into place, so a
    failure never leaves a half-written bundle. An existing ``out`` is replaced only if it is
    empty or a moec bundle (``force`` replaces anything). ``sign_key`` (an Ed25519 private key
    file) adds ``manifest.sig``. The result is verified before it is renamed into place.
    """
    out = check_output_dir(out, force)
    for name in files:
        check_name(name, "bundle file")
    reclaim_stale(out.parent, staging_prefix(out))
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f"{staging_prefix(out)}{os.getpid()}-", dir=out.parent))
    except OSError as exc:
        raise MoecError(f"cannot create bundle directory '{out}': {exc.strerror}") from None
    try:
        entries = {}
        for name, src in files.items():
            dst = tmp / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if name in move:  # large temporaries of this build on the same file system
                shutil.move(src, dst)
            else:
                shutil.copyfile(src, dst)
            entries[name] = {"sha256": sha256_file(dst), "bytes": dst.stat().st_size}
        full = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "files": entries}
        data = (json.dumps(full, indent=2) + "\n").encode()
        (tmp / MANIFEST).write_bytes(data)
        if sign_key is not None:
            (tmp / SIGNATURE_FILE).write_bytes(sign(data, sign_key))
        verify_bundle(tmp, where=f"bundle being written to '{out}'")
        tmp.chmod(0o755)
        replace_dir(tmp, out)
    except OSError as exc:
        raise MoecError(f"cannot write bundle '{out}': {exc.strerror or exc}") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _scan(root: Path) -> tuple[set[str], set[str]]:
    """(regular files, directories) under ``root`` as relative POSIX names; raises on links and specials."""
    files, dirs, stack = set(), set(), [("", root)]
    while stack:
        rel, d = stack.pop()
        try:
            entries = list(os.scandir(d))
        except OSError as exc:
            raise MoecError(f"cannot read bundle directory '{d}': {exc.strerror or exc}") from None
        for e in entries:
            name = f"{rel}{e.name}"
            st = os.lstat(e.path)
            if stat.S_ISLNK(st.st_mode):
                raise MoecError(f"bundle '{root}': '{name}' is a symbolic link; refusing to load")
            if stat.S_ISDIR(st.st_mode):
                dirs.add(name)
                stack.append((name + "/", Path(e.path)))
            elif stat.S_ISREG(st.st_mode):
                files.add(name)
            else:
                raise MoecError(f"bundle '{root}': '{name}' is not a regular file; refusing to load")
    return files, dirs


def _read_nofollow(path: Path, limit: int | None = None) -> bytes:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        return f.read() if limit is None else f.read(limit + 1)


#: Bytes read per step while hashing: one reused buffer, so verifying a file of any size holds 4 MiB.
HASH_CHUNK = 4 << 20


def _hash_nofollow(path: Path) -> tuple[str, int]:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    h, n = hashlib.sha256(), 0
    buf = bytearray(HASH_CHUNK)
    view = memoryview(buf)
    with os.fdopen(fd, "rb", buffering=0) as f:
        while True:
            got = f.readinto(buf)
            if not got:
                break
            h.update(view[:got])  # hashlib drops the GIL for large updates
            n += got
    return h.hexdigest(), n


def _load_manifest(root: Path) -> tuple[dict, bytes]:
    if root.is_symlink() or not root.is_dir():
        raise MoecError(f"bundle '{root}' does not exist or is not a directory")
    mf = root / MANIFEST
    if mf.is_symlink():
        raise MoecError(f"bundle '{root}': {MANIFEST} is a symbolic link; refusing to load")
    if not mf.is_file():
        raise MoecError(f"'{root}' is not a moec bundle (no {MANIFEST})")
    data = _read_nofollow(mf, MAX_MANIFEST_BYTES)
    if len(data) > MAX_MANIFEST_BYTES:
        raise MoecError(f"bundle manifest '{mf}' is larger than {MAX_MANIFEST_BYTES >> 20} MiB")
    manifest = loads_strict(data, f"bundle manifest '{mf}'")
    check_manifest(manifest, f"bundle '{root}'")
    return manifest, data


def verify_bundle(bundle: str | os.PathLike, trust: str | os.PathLike | None = None,
                  where: str | None = None, trust_verified: bool = False) -> dict:
    """The manifest of ``bundle`` after the whole bundle verifies; raises MoecError otherwise.

    Checks the schema, that the directory holds exactly the listed files (plus the manifest
    and an optional signature) with no links, special files or escaping names, each file's
    size and sha256, and, with ``trust`` (an Ed25519 public key file), the signature.

    ``trust_verified`` (opt-in) skips the sha256 of files unchanged since this user's last full
    verification with ``trust_verified`` (``verified_stamp.py``: same size, mtime, ctime, inode and
    device); every other check still runs, and files that verified are stamped for next time.
    """
    root = Path(bundle)
    where = where or f"bundle '{root}'"
    manifest, data = _load_manifest(root)
    listed = set(manifest["files"])
    found, dirs = _scan(root)
    extra = sorted(found - listed - {MANIFEST, SIGNATURE_FILE})
    if extra:
        raise MoecError(f"{where}: file '{extra[0]}' is not listed in {MANIFEST} (tampered?); refusing to load")
    missing = sorted(listed - found)
    if missing:
        raise MoecError(f"{where}: bundle file '{missing[0]}' is missing")
    needed = {p.as_posix() for n in listed for p in PurePosixPath(n).parents}  # folders of listed files
    stray = sorted(d for d in dirs if d not in needed)
    if stray:
        raise MoecError(f"{where}: directory '{stray[0]}' is not part of the bundle; refusing to load")
    stamped = read_stamp(root, data) if trust_verified else {}
    verified: dict[str, list[int]] = {}
    for name in sorted(listed):
        entry = manifest["files"][name]
        ident = identity(root / name)
        if ident[0] != entry["bytes"]:
            raise MoecError(f"{where}: bundle file '{name}' has {ident[0]} bytes, {MANIFEST} says {entry['bytes']} "
                            "(tampered or corrupt); refusing to load")
        if stamped.get(name) != ident:
            digest, _ = _hash_nofollow(root / name)
            if digest != entry["sha256"]:
                raise MoecError(f"{where}: bundle file '{name}' does not match its sha256 in {MANIFEST} "
                                "(tampered or corrupt); refusing to load")
        verified[name] = ident
    sig = root / SIGNATURE_FILE
    if trust is not None:
        if SIGNATURE_FILE not in found:
            raise MoecError(f"{where} is not signed ({SIGNATURE_FILE} missing) but --trust asks for a signature; "
                            "refusing to load")
        verify(data, _read_nofollow(sig, 4096), trust, where)
    if trust_verified and verified != stamped:
        write_stamp(root, data, verified)
    manifest["_signed"] = SIGNATURE_FILE in found
    manifest["_signature_checked"] = trust is not None
    return manifest


def read_manifest(bundle: str | os.PathLike, verify: bool = True, trust: str | os.PathLike | None = None) -> dict:
    """The bundle's manifest, schema-checked; with ``verify`` the whole bundle is verified (``verify_bundle``)."""
    if verify or trust is not None:
        return verify_bundle(bundle, trust)
    return _load_manifest(Path(bundle))[0]


def verified_bytes(bundle: str | os.PathLike, name: str, manifest: dict) -> bytes:
    """Bundle file ``name``, read once and checked against its sha256 again (what is used is what was checked)."""
    data = _read_nofollow(Path(bundle) / name)
    if hashlib.sha256(data).hexdigest() != manifest["files"][name]["sha256"]:
        raise MoecError(f"bundle file '{name}' changed after verification; refusing to load")
    return data


def verified_copy(bundle: str | os.PathLike, name: str, manifest: dict, dest_dir: str | os.PathLike) -> Path:
    """Copy bundle file ``name`` into ``dest_dir`` (private) and check the copy's sha256 again.

    The library is loaded from this copy, so swapping ``lib.so`` after verification cannot
    get foreign code loaded.
    """
    data = verified_bytes(bundle, name, manifest)
    dst = Path(dest_dir) / Path(name).name
    fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return dst
