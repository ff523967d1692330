"""On-disk cache of quantized, packed weights keyed by (weight bytes, method, bits, group size, calibration).

Compiling or searching several plans of one checkpoint quantizes the same expert at the same
bits again and again; with a cache only the first compile pays. An entry is keyed by the sha256 of
the float32 weight, its shape, the method, bits and group size, the activation importance and
GPTQ Hessian (their bytes) and GPTQ options, and :data:`NUMERICS_VERSION` (bumped whenever a
quantizer's output changes), so a hit is exactly what quantizing again would give.

Layout: ``DIR/<key[:2]>/<key>.qc``, each file ``MAGIC``, a 4-byte header length, a JSON header
(key, shape, bits, group size, array dtypes and shapes, sha256 of the payload) and the payload.
Every read checks the magic, the key, the shapes the request implies and the payload's sha256;
anything else (truncated, corrupt, foreign) is a miss and the file is removed. Files are written
to a temporary name and renamed, so readers never see a partial entry. The cache is bounded:
after a write, the least recently used entries (by mtime, refreshed on every hit) are removed
until the total is under 90 % of ``max_bytes``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from pathlib import Path

import numpy as np

from moec.core.errors import MoecError
from moec.core.formats import DEFAULT_SCALES, get_scale_format
from moec.quant.pack import packed_row_bytes

log = logging.getLogger("moec.quant")

#: Bump when any quantizer's output changes: old entries then never match.
NUMERICS_VERSION = 1
MAGIC = b"MOECQC1\n"
SUFFIX = ".qc"
#: Default bound of a cache directory (``MOEC_QUANT_CACHE_GB`` overrides it).
DEFAULT_MAX_GB = 8.0
_MAX_HEADER = 1 << 16


def _update(h, arr: np.ndarray | None, dtype) -> None:
    if arr is not None:
        h.update(memoryview(np.ascontiguousarray(arr, dtype=dtype)).cast("B"))


def cache_key(w: np.ndarray, bits: int, group_size: int, method: str, importance: np.ndarray | None = None,
              hessian: np.ndarray | None = None, gptq_options: dict | None = None, scales: str = DEFAULT_SCALES) -> str:
    """The hex sha256 naming the packed result of quantizing float32 ``w`` this way."""
    meta = {"numerics": NUMERICS_VERSION, "shape": list(np.shape(w)), "bits": int(bits),
            "group_size": int(group_size), "method": str(method), "gptq": gptq_options or {},
            "importance": importance is not None, "hessian": None if hessian is None else list(np.shape(hessian))}
    if scales != DEFAULT_SCALES:  # fp16 keys stay those of earlier entries
        meta["scales"] = scales
    h = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode())
    _update(h, w, np.float32)
    _update(h, importance, np.float32)
    _update(h, hessian, np.float64)
    return h.hexdigest()


def _expected(shape: tuple[int, int], bits: int, group_size: int,
              scales: str = DEFAULT_SCALES) -> dict[str, tuple[str, tuple[int, int]]]:
    n, k = shape
    g = k // group_size
    fmt = get_scale_format(scales)
    out = {"packed": ("uint8", (n, packed_row_bytes(k, bits))), "scale": (fmt.code_dtype, (n, g)),
           "zero": ("uint8", (n, packed_row_bytes(g, bits)))}
    if fmt.double_quantized:
        out["super_scale"] = ("float16", (n, -(-g // fmt.super_groups)))
    return out


class QuantCache:
    """A bounded directory of packed quantized weights (module docstring); ``hits``/``misses`` count lookups."""

    def __init__(self, directory: str | os.PathLike, max_bytes: int | None = None) -> None:
        self.dir = Path(directory)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MoecError(f"cannot create quantization cache '{self.dir}': {exc.strerror or exc}") from None
        if not os.access(self.dir, os.W_OK):
            raise MoecError(f"quantization cache '{self.dir}' is not writable")
        self.max_bytes = int(max_bytes if max_bytes is not None else _env_max_gb() * (1 << 30))
        self.hits = self.misses = 0
        self._total = sum(p.stat().st_size for p in self._entries())

    def _entries(self) -> list[Path]:
        return [p for p in self.dir.glob(f"??/*{SUFFIX}") if p.is_file() and not p.is_symlink()]

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}{SUFFIX}"

    def get(self, key: str, shape: tuple[int, int], bits: int, group_size: int,
            scales: str = DEFAULT_SCALES) -> dict[str, np.ndarray] | None:
        """The cached arrays (``packed``, ``scale``, ``zero``, ``super_scale`` with ``u8`` scales) or None;
        a bad entry is removed and is a miss."""
        path = self._path(key)
        try:
            data = path.read_bytes()
        except OSError:
            self.misses += 1
            return None
        arrays = _decode(data, key, tuple(shape), int(bits), int(group_size), scales)
        if arrays is None:
            log.warning("quantization cache entry %s is corrupt or foreign; recomputing", path.name)
            self._remove(path)
            self.misses += 1
            return None
        try:
            os.utime(path)  # least recently used goes first
        except OSError:
            pass
        self.hits += 1
        return arrays

    def put(self, key: str, shape: tuple[int, int], bits: int, group_size: int, arrays: dict[str, np.ndarray],
            scales: str = DEFAULT_SCALES) -> None:
        """Store ``arrays`` under ``key`` atomically, then evict to the bound. I/O errors only log."""
        want = _expected(tuple(shape), int(bits), int(group_size), scales)
        parts = [np.ascontiguousarray(arrays[name]) for name in want]
        payload = b"".join(memoryview(a).cast("B") for a in parts)
        header = json.dumps({"key": key, "shape": list(shape), "bits": int(bits), "group_size": int(group_size),
                             "arrays": {n: [str(a.dtype), list(a.shape)] for n, a in zip(want, parts)},
                             "sha256": hashlib.sha256(payload).hexdigest()}).encode()
        path = self._path(key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(MAGIC + struct.pack("<I", len(header)) + header + payload)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot write quantization cache entry %s: %s", path, exc.strerror or exc)
            tmp.unlink(missing_ok=True)
            return
        self._total += path.stat().st_size
        if self._total > self.max_bytes:
            self._evict()

    def _remove(self, path: Path) -> None:
        try:
            size = path.stat().st_size
            path.unlink()
            self._total -= size
        except OSError:
            pass

    def _evict(self) -> None:
        entries = []
        for p in self._entries():
            try:
                st = p.stat()
            except OSError:
                continue
            entries.append((st.st_mtime_ns, st.st_size, p))
        entries.sort()
        self._total = sum(e[1] for e in entries)
        for _, _, p in entries:
            if self._total <= 0.9 * self.max_bytes:
                break
            self._remove(p)


def _decode(data: bytes, key: str, shape: tuple[int, int], bits: int, group_size: int,
            scales: str = DEFAULT_SCALES) -> dict[str, np.ndarray] | None:
    """The arrays of one entry's bytes, or None unless every check passes."""
    head = len(MAGIC) + 4
    if len(data) < head or not data.startswith(MAGIC):
        return None
    (hlen,) = struct.unpack("<I", data[len(MAGIC):head])
    if hlen > _MAX_HEADER or len(data) < head + hlen:
        return None
    try:
        header = json.loads(data[head:head + hlen])
    except (ValueError, UnicodeDecodeError):
        return None
    want = _expected(shape, bits, group_size, scales)
    if (not isinstance(header, dict) or header.get("key") != key or header.get("shape") != list(shape)
            or header.get("bits") != bits or header.get("group_size") != group_size
            or header.get("arrays") != {n: [d, list(s)] for n, (d, s) in want.items()}):
        return None
    payload = data[head + hlen:]
    if len(payload) != sum(np.dtype(d).itemsize * s[0] * s[1] for d, s in want.values()):
        return None
    if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
        return None
    out, pos = {}, 0
    for name, (dtype, s) in want.items():
        nbytes = np.dtype(dtype).itemsize * s[0] * s[1]
        out[name] = np.frombuffer(payload, dtype=dtype, count=s[0] * s[1], offset=pos).reshape(s).copy()
        pos += nbytes
    return out


def _env_max_gb() -> float:
    env = os.environ.get("MOEC_QUANT_CACHE_GB")
    if not env:
        return DEFAULT_MAX_GB
    try:
        value = float(env)
    except ValueError:
        value = -1.0
    if not value > 0 or value != value or value == float("inf"):
        raise MoecError(f"MOEC_QUANT_CACHE_GB must be a positive number of GiB, got {env!r}")
    return value


def cache_from_env() -> QuantCache | None:
    """The cache named by ``MOEC_QUANT_CACHE`` (a directory), or None when it is unset."""
    directory = os.environ.get("MOEC_QUANT_CACHE")
    return QuantCache(directory) if directory else None
