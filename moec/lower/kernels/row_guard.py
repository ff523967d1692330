"""Row guard: a scheduled routed-expert kernel skips the rows whose expert id is negative.

A bit class' kernel gets ``top_k`` expert ids per call, one per routed expert; ids of routed
experts that belong to *another* bit class are -1. Without a guard those rows would still be
computed from some expert of this class, reading its weights from memory for nothing (the
dominant cost of a mixed plan: with four bit classes a decode step would read up to four
times the routed weights). With the guard a row with id -1 does no work at all: its output
row is left unwritten and masked by the caller (``where``), or written 0 by kernels that say so
(``moec.row_zero``: the x86 int8 GEMVs; the caller then needs no mask), and a call with no routed
member only pays the per-call activation preparation.

Schedules keep the routed-expert loop ``j`` outermost (fused with the output tiles into
one parallel loop, ``j`` major), so the guard wraps the body of every top-level parallel
loop that comes from ``j``: the row is ``fused // (extent / top_k)``. TVM 0.27 has no Python
statement mutator, so the few enclosing nodes (root block realize, block, sequence) are
rebuilt with their constructors.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.tirx import stmt as ts

from moec.core.errors import MoecError

#: PrimFunc attribute set on kernels that skip rows whose expert id is negative.
GUARD_ATTR = "moec.row_guard"


#: PrimFunc attribute set on guarded kernels that also write 0 to those rows (no mask needed after them).
ZERO_ATTR = "moec.row_zero"


def zeroes_unrouted_rows(func: tirx.PrimFunc) -> bool:
    """Whether ``func`` writes 0 to rows whose expert id is -1 (so callers need no ``where`` after it)."""
    return bool(func.attrs is not None and func.attrs.get(ZERO_ATTR, False))


def has_row_guard(func: tirx.PrimFunc) -> bool:
    """Whether ``func`` skips rows whose expert id is -1 (so callers may pass -1)."""
    return bool(func.attrs is not None and func.attrs.get(GUARD_ATTR, False))


def guard_routed_rows(func: tirx.PrimFunc, top_k: int, ids_name: str = "expert_ids") -> tirx.PrimFunc:
    """``func`` with each routed-row loop's body under ``if expert_ids[row] >= 0``.

    Parameters
    ----------
    func : tvm.tirx.PrimFunc
        A scheduled GEMV whose root block holds top-level loops; the routed-row loops are
        parallel and named from ``j`` (``j_...``), ``j`` major.
    top_k : int
        Rows of ``expert_ids`` (the routed experts per call).
    ids_name : str
        Name of the ``expert_ids`` parameter.

    Returns
    -------
    tvm.tirx.PrimFunc
        The same function with guarded row loops and the ``moec.row_guard`` attribute; ``func``
        itself when it has no such loop (then every id passed to it must be a valid expert).
    """
    ids = _param_buffer(func, ids_name)
    realize = func.body
    if not isinstance(realize, s_tir.stmt.SBlockRealize):
        raise MoecError("row guard: kernel is not in block form (guard before lowering)")
    block = realize.block
    stmts = list(block.body.seq) if isinstance(block.body, ts.SeqStmt) else [block.body]
    guarded = 0
    for i, stmt in enumerate(stmts):
        if _is_row_loop(stmt, top_k):
            stmts[i] = _guard_loop(stmt, ids, top_k)
            guarded += 1
    if not guarded:  # a schedule without j-major parallel rows: callers keep ids valid instead
        return func
    body = ts.SeqStmt(stmts) if len(stmts) > 1 else stmts[0]
    new_block = s_tir.stmt.SBlock(block.iter_vars, block.reads, block.writes, block.name_hint, body,
                                  block.init, block.alloc_buffers, block.match_buffers,
                                  block.annotations)
    new_realize = s_tir.stmt.SBlockRealize(realize.iter_values, realize.predicate, new_block)
    return func.with_body(new_realize).with_attr(GUARD_ATTR, True)


def _param_buffer(func: tirx.PrimFunc, name: str):
    for param in func.params:  # in TVM 0.27 buffer parameters are the buffers themselves
        if param.name == name:
            return param
    raise MoecError(f"row guard: kernel has no parameter buffer {name!r}")


def _is_row_loop(stmt, top_k: int) -> bool:
    return (isinstance(stmt, ts.For) and stmt.kind == ts.ForKind.PARALLEL
            and stmt.loop_var.name.startswith("j_")
            and isinstance(stmt.extent, tirx.IntImm) and stmt.extent.value % top_k == 0)


def _guard_loop(loop: ts.For, ids, top_k: int) -> ts.For:
    per_row = loop.extent.value // top_k
    row = loop.loop_var if per_row == 1 else tirx.floordiv(loop.loop_var, per_row)
    cond = tirx.BufferLoad(ids, [row]) >= tirx.const(0, "int32")
    body = ts.IfThenElse(cond, loop.body, None)
    return ts.For(loop.loop_var, loop.min, loop.extent, loop.kind, body, loop.thread_binding,
                  loop.annotations)
