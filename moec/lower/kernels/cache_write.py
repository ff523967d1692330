"""Write ``T`` tokens' keys (or values) into a fixed-capacity KV cache in place, at positions ``pos..pos+T-1``.

``write(cache [kv_heads, C, width], new [T, kv_heads, width], pos)`` with ``C`` and ``T`` symbolic:
``cache[g, pos + t, :] = new[t, g, :]`` (prefill's rows); with ``rows_first=False`` ``new`` is
``[kv_heads, T, width]`` (decode's token, ``T = 1``). Called through ``call_tir_inplace`` (the cache is both an
argument and the result), so the graph allocates and copies nothing. Used by prefill and by decode
layers that keep the op-by-op attention (sliding window, sinks, GPU bundles); the fused CPU decode
attention kernel writes its token itself. A plain spatial block: CPU runs the loop nest as it is,
the GPU rules bind its threads.
"""

# No `from __future__ import annotations`: TVMScript needs the evaluated buffer annotations.

from tvm import tirx
from tvm.script import tirx as T


def cache_write(kv_heads: int, width: int, rows_first: bool = True) -> tirx.PrimFunc:
    """The in-place cache write for one cache kind (``[kv_heads, C, width]`` float32)."""
    if not rows_first:
        return _heads_first(kv_heads, width)

    @T.prim_func(check_well_formed=False)  # tirx's verifier does not know s_tir blocks
    def write(cache_h: T.handle, new_h: T.handle, pos: T.int64):
        T.func_attr({"global_symbol": "kv_cache_write", "tirx.noalias": True})
        capacity = T.int64()
        rows = T.int64()
        cache = T.match_buffer(cache_h, (kv_heads, capacity, width), "float32")
        new = T.match_buffer(new_h, (rows, kv_heads, width), "float32")
        with T.sblock("root"):  # a root block and explicit regions: what the GPU rules schedule
            for t, g, d in T.grid(rows, kv_heads, width):
                with T.sblock("write"):
                    vt, vg, vd = T.axis.remap("SSS", [t, g, d])
                    T.reads(new[vt, vg, vd])
                    T.writes(cache[vg, pos + vt, vd])
                    cache[vg, pos + vt, vd] = new[vt, vg, vd]

    return write


def _heads_first(kv_heads: int, width: int) -> tirx.PrimFunc:
    @T.prim_func(check_well_formed=False)
    def write(cache_h: T.handle, new_h: T.handle, pos: T.int64):
        T.func_attr({"global_symbol": "kv_cache_write", "tirx.noalias": True})
        capacity = T.int64()
        rows = T.int64()
        cache = T.match_buffer(cache_h, (kv_heads, capacity, width), "float32")
        new = T.match_buffer(new_h, (kv_heads, rows, width), "float32")
        with T.sblock("root"):
            for g, t, d in T.grid(kv_heads, rows, width):
                with T.sblock("write"):
                    vg, vt, vd = T.axis.remap("SSS", [g, t, d])
                    T.reads(new[vg, vt, vd])
                    T.writes(cache[vg, pos + vt, vd])
                    cache[vg, pos + vt, vd] = new[vg, vt, vd]

    return write
