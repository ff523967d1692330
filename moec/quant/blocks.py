"""Row-blocked, threaded evaluation of a per-group quantizer search (same result as one whole-matrix call).

Every quantization method chooses each group's ``(scale, zero)`` from that group alone, so the
rows of ``wg [N, G, gs]`` can be searched in blocks: a block of about 256 KB keeps the search's
float32 scratch in the L2 cache instead of streaming an ``[N, G, gs]`` temporary through memory
once per candidate, and blocks are independent work for a small thread pool (numpy releases the
GIL inside its loops). ``MOEC_QUANT_THREADS`` sets the pool size (default: the CPU count, at most 8;
1 disables threading).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from moec.core.errors import MoecError

#: float32 elements of ``wg`` per block (256 KB).
BLOCK_ELEMS = 1 << 16

_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_lock = threading.Lock()


def _forget_pool() -> None:
    """In a forked child the pool's threads do not exist: start a new pool there when needed."""
    global _pool, _pool_size, _lock
    _pool, _pool_size, _lock = None, 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def quant_threads() -> int:
    """Threads for quantizer searches: ``MOEC_QUANT_THREADS`` or the CPU count (at most 8)."""
    env = os.environ.get("MOEC_QUANT_THREADS")
    if env is None or env == "":
        return max(1, min(8, os.cpu_count() or 1))
    if not env.isdigit() or int(env) < 1:
        raise MoecError(f"MOEC_QUANT_THREADS must be a positive integer, got {env!r}")
    return int(env)


def _executor(threads: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size != threads:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool, _pool_size = ThreadPoolExecutor(threads, thread_name_prefix="moec-quant"), threads
        return _pool


def by_row_blocks(fn: Callable, wg: np.ndarray, bits: int,
                  importance: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """``fn(wg, bits, importance) -> (scale fp16 [N, G], zero uint8 [N, G])`` evaluated block by block.

    ``fn`` must decide each group from that group alone (every method in ``QUANT_METHODS`` does),
    which makes the result identical to ``fn(wg, bits, importance)``. Called from a quantizer
    thread it runs the blocks in that thread (no nested waiting on the pool).
    """
    n = wg.shape[0]
    step = max(1, BLOCK_ELEMS // max(1, wg.shape[1] * wg.shape[2]))
    starts = list(range(0, n, step))
    scale = np.empty(wg.shape[:2], np.float16)
    zero = np.empty(wg.shape[:2], np.uint8)

    def run(r0: int) -> None:
        scale[r0:r0 + step], zero[r0:r0 + step] = fn(wg[r0:r0 + step], bits, importance)

    threads = quant_threads()
    if threads == 1 or len(starts) == 1 or threading.current_thread().name.startswith("moec-quant"):
        for r0 in starts:
            run(r0)
    else:
        for f in [_executor(threads).submit(run, r0) for r0 in starts]:
            f.result()  # re-raises a block's MoecError (e.g. a scale beyond float16)
    return scale, zero
