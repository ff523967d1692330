"""Top-k of short rows (a router's expert scores) as one CPU kernel: rank selection, no sort.

``values[r, j]``, ``indices[r, j]``: the ``k`` largest entries of row ``r`` of ``x [R, n]``
(``R`` symbolic), descending, ties to the lower index: entry ``i`` has rank ``#{m : x[m] > x[i]}
+ #{m < i : x[m] == x[i]}`` and goes to slot ``rank`` when that is below ``k``, the order of a
stable descending sort, which is what Relax's ``topk`` (TVM's ``tvm.contrib.sort``, a
``std::stable_sort``) gives. ``n * n`` compares per row: meant for routers (``n`` up to
:data:`MAX_EXPERTS`), where it replaces the sort library's call, buffers and sort of 8 values.
"""

# No `from __future__ import annotations`: TVMScript needs the evaluated buffer annotations.

from tvm import tirx
from tvm.script import tirx as T

#: Longest row this kernel is used for (``n * n`` compares per row).
MAX_EXPERTS = 64


def row_topk_kernel(n: int, k: int) -> tirx.PrimFunc:
    """``row_topk(x [R, n] float32, values [R, k] float32, indices [R, k] int32)``, rows in parallel."""

    @T.prim_func(check_well_formed=False)
    def row_topk(x_h: T.handle, values_h: T.handle, indices_h: T.handle):
        T.func_attr({"global_symbol": "row_topk", "tirx.noalias": True})
        rows = T.int64()
        x = T.match_buffer(x_h, (rows, n), "float32")
        values = T.match_buffer(values_h, (rows, k), "float32")
        indices = T.match_buffer(indices_h, (rows, k), "int32")
        with T.sblock("root"):
            for r in T.parallel(rows):
                for i in range(n):
                    rank = T.alloc_buffer((1,), "int32", scope="local")
                    rank[0] = 0
                    for m in range(n):
                        if x[r, m] > x[r, i] or (x[r, m] == x[r, i] and m < i):
                            rank[0] = rank[0] + 1
                    if rank[0] < k:
                        values[r, rank[0]] = x[r, i]
                        indices[r, rank[0]] = i

    return row_topk
