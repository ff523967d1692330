"""A remote device's TVM tensor cache holding a bundle's weights and KV caches for its resident entries
(``lower/resident.py``): filled once when a session (or a farm measurement) opens, read by every call."""

from __future__ import annotations

import logging
from collections.abc import Callable

from moec.artifact.resident_keys import SUFFIX, param_key
from moec.core.errors import MoecError, last_line

log = logging.getLogger("moec")


class TensorHolder:
    """A remote device's TVM tensor cache (``vm.builtin.tensor_cache``) holding a session's weights and KV caches
    for the bundle's resident entries (``lower/resident.py``)."""

    def __init__(self, update, get, clear) -> None:
        self._update, self._get, self._clear = update, get, clear

    @classmethod
    def on(cls, remote) -> "TensorHolder | None":
        """The holder of ``remote`` (None for a local session, or a device whose TVM runtime lacks the cache:
        its calls then pass the tensors, copied each call)."""
        if remote is None:
            return None
        try:
            return cls(*(remote.get_function(f"vm.builtin.tensor_cache.{f}") for f in ("update", "get", "clear")))
        except Exception:  # an older runtime on the device
            log.warning("the remote TVM runtime has no tensor cache: each call copies the weights there")
            return None

    @classmethod
    def for_bundle(cls, remote, manifest: dict) -> "TensorHolder | None":
        """The holder a call of ``manifest``'s bundle on ``remote`` goes through: None locally and for bundles
        compiled without resident entries; a CUDA bundle that replays CUDA graphs cannot run over RPC without one
        (each call's copies would have new addresses), which is a one-line error."""
        holder = cls.on(remote) if remote is not None and "decode" + SUFFIX in manifest.get("entry", {}) else None
        if holder is not None and holder._get(param_key(0)) is not None:  # the cache is the server process's
            raise MoecError("this RPC session already holds another bundle session's tensors; open one "
                            "BundleSession per RPC session (or close the other first)")
        if remote is not None and holder is None and manifest.get("backend", {}).get("cuda_graphs"):
            raise MoecError("this CUDA bundle replays CUDA graphs, which need its weights held on the device, and "
                            "the remote TVM runtime has no tensor cache (vm.builtin.tensor_cache): install "
                            "apache-tvm 0.27 or newer there")
        return holder

    def release(self) -> None:
        try:
            self._clear()
        except Exception:  # the server is gone, and its memory with it
            pass

    def hold(self, tensors: list, key: Callable[[int], str]) -> None:
        """Place ``tensors[i]`` under ``key(i)`` (the device copies it once) and replace the list's handle with
        the held tensor's, so later writes (``set_plan``'s width tables) reach what the entries read; each
        uploaded copy is dropped as soon as it is held."""
        failure = None
        try:
            for i in range(len(tensors)):
                self._update(key(i), tensors[i], True)
                tensors[i] = None
                tensors[i] = self._get(key(i))
        except Exception as exc:  # the device ran out of memory, or the session ended
            failure = last_line(exc)
        if failure is not None:  # raised outside the except block, whose frames would keep the RPC session
            raise MoecError(f"cannot hold the bundle's tensors on the remote device: {failure}")
