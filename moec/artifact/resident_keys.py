"""Names shared by a bundle's resident entries (``lower/resident.py``, which compiles them) and the session that
fills the device's TVM tensor cache for them (``runtime/session.py``): one definition of the calling contract."""

from __future__ import annotations

#: Suffix of a resident entry's name (``decode`` → ``decode_resident``).
SUFFIX = "_resident"


def param_key(i: int) -> str:
    """Tensor-cache key of the bundle's ``i``-th weight (manifest ``params`` order)."""
    return f"moec.param.{i}"


def cache_key(i: int) -> str:
    """Tensor-cache key of the ``i``-th KV cache tensor (argument order: key then value per layer)."""
    return f"moec.cache.{i}"
