"""Decode GEMV over nested (any-precision) expert stacks: each expert's width is a run-time input.

Every routed expert of a layer is stored once, at the nested format's storage width, as bit-plane
segments (``moec.quant.nested``), each in the kernel layout of ``layout.py`` (row-interleaved
uint32 words, tile ``T``). The kernel takes ``prec`` int32 ``[E]``, the width each expert is served
at now, as an ordinary argument: changing it changes what the next call reads, with no rebuild.

For routed row ``j`` with expert ``e = expert_ids[j]`` and width ``k = prec[e]``::

    y[j, n] = sum_g scale[n, g] · ( qdot_k[n, g] − (zero[n, g] − (2**(B−k) − 1) / 2) · xsum[g] )

with ``qdot_k[n, g] = sum_{i in g} (q[n, i] >> (B−k) << (B−k)) · x[i]`` (``B`` the storage width):
the width-``k`` weight of ``moec.quant.nested`` exactly. Block ``qdot{d}`` serves the ``d``-th
derived width. The segments are in byte-lane word order (``layout.byte_lane_words``), so for
each 8-bit word ``m`` of a group (codes ``4m .. 4m+3``) the kernel rebuilds, with one shift,
one mask and one or per needed segment, the word the fixed 8-bit kernel would read: byte ``c``
holds code ``4m + c`` truncated to its top ``k`` bits (the planes the width skips are simply
absent). Each code is then multiplied where it sits, as the fixed kernel does:
``(word & 0xFF << 8c) · (x[i] · 2**-8c)`` (``xs``), so the rebuild costs a few integer ops per
4 codes and the float work per code is the fixed kernel's. Each ``qdot{d}`` update loop sits
under ``if prec[expert_ids[j]] == k_d`` (:func:`guard_segments`): exactly one specialised inner
loop runs per routed row, the width branch is outside it, and the planes a width does not need
are never loaded; the other accumulators keep their initial 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm import s_tir, te, tirx
from tvm.tirx import stmt as ts

from moec.core.errors import MoecError
from moec.core.formats import NestedFormat, get_nested_format
from moec.lower.kernels.decode import code_at
from moec.lower.kernels.gemv import _pow2
from moec.lower.kernels.layout import num_tiles, zero_words
from moec.quant.nested import segment_positions

#: PrimFunc attribute set on nested kernels whose unneeded segments are skipped.
SEGMENT_GUARD_ATTR = "moec.segment_guard"


@dataclass(frozen=True)
class NestedGemvSpec:
    """Shape of one nested GEMV kernel.

    Attributes
    ----------
    storage_bits : int
        A key of ``NESTED_FORMATS``.
    n, k, group_size, num_stacked, top_k, tile, x_per_expert
        As in :class:`moec.lower.kernels.gemv.GemvSpec`.
    """

    storage_bits: int
    n: int
    k: int
    group_size: int
    num_stacked: int
    top_k: int
    tile: int
    x_per_expert: bool = False

    def __post_init__(self) -> None:
        fmt = get_nested_format(self.storage_bits)
        if self.n < 1 or self.k < 1 or self.num_stacked < 1 or self.top_k < 1 or self.tile < 1:
            raise MoecError(f"bad nested kernel shape n={self.n} k={self.k} experts={self.num_stacked} "
                            f"top_k={self.top_k} tile={self.tile}")
        if self.group_size < 1 or self.k % self.group_size or any(
                self.group_size * w % 32 or 8 % w for w in fmt.segment_bits):
            raise MoecError(f"nested kernels need group_size ({self.group_size}) to divide K ({self.k}) and "
                            f"be a multiple of 32 (every 1-bit plane of a group fills whole uint32 words)")

    @property
    def format(self) -> NestedFormat:
        return get_nested_format(self.storage_bits)

    @property
    def groups(self) -> int:
        return self.k // self.group_size

    @property
    def rows(self) -> int:
        return self.n

    @property
    def quantized(self) -> bool:
        return True


def nested_gemv_definition(spec: NestedGemvSpec) -> tirx.PrimFunc:
    """Unscheduled nested GEMV ``y[j, :] = W_{prec[e]}[e] @ x[j or 0]``, ``e = expert_ids[j]``.

    Parameters, in order: ``x`` float32 ``[XR, K]``, one ``seg{s}`` uint32 ``[E, NT, K*w_s/32, T]``
    per segment, ``scale`` float16 ``[E, NT, G, T]``, ``zero`` uint32 ``[E, NT, ZW, T]`` (storage
    width codes), ``prec`` int32 ``[E]``, ``expert_ids`` int32 ``[top_k]``, ``y`` float32
    ``[top_k, N]``. Blocks: ``xsum``, ``qdot{d}`` (one per derived width), ``y``.
    """
    fmt = spec.format
    gs, tile, groups = spec.group_size, spec.tile, spec.groups
    nt = num_tiles(spec.n, tile)
    xr = spec.top_k if spec.x_per_expert else 1
    x = te.placeholder((xr, spec.k), "float32", "x")
    segs = [te.placeholder((spec.num_stacked, nt, spec.k * w // 32, tile), "uint32", f"seg{s}")
            for s, w in enumerate(fmt.segment_bits)]
    scale = te.placeholder((spec.num_stacked, nt, groups, tile), "float16", "scale")
    zero = te.placeholder((spec.num_stacked, nt, zero_words(groups, spec.storage_bits), tile), "uint32", "zero")
    prec = te.placeholder((spec.num_stacked,), "int32", "prec")
    ids = te.placeholder((spec.top_k,), "int32", "expert_ids")

    def xrow(j):
        return j if spec.x_per_expert else 0

    i = te.reduce_axis((0, gs), "i")
    xsum = te.compute((xr, groups), lambda r, g: te.sum(x[r, g * gs + i], axis=i), name="xsum")
    # x pre-scaled by 2**-8c for the code in byte c of its word (as the fixed kernel's ``xs``).
    xs = te.compute((xr, spec.k), lambda r, c: x[r, c] * _pow2(-8 * (c % 4)), name="xs")
    positions = segment_positions(fmt)

    def qdot(d):
        """Width ``derived_bits[d]``: segments ``0..d`` or-ed into 8-bit words, one code per byte.

        The reduction runs over the group's 8-bit words (4 codes each), so each word is
        assembled once and its 4 codes update the accumulator in one step.
        """
        mm = te.reduce_axis((0, gs // 4), f"m{d}")

        def body(j, b, g, lane):
            word8 = None
            for s in range(d + 1):
                width, wpg = fmt.segment_bits[s], gs * fmt.segment_bits[s] // 32
                per = 8 // width
                word = segs[s][ids[j], b, g * wpg + mm // per, lane]
                lanes = tirx.const(((1 << width) - 1) * 0x01010101, "uint32")
                part = ((word >> ((mm % per) * width).astype("uint32")) & lanes) << tirx.const(positions[s], "uint32")
                word8 = part if word8 is None else word8 | part
            term = None
            for c in range(4):
                code = (word8 & tirx.const(((1 << spec.storage_bits) - 1) << (8 * c), "uint32")).astype("float32")
                t = code * xs[xrow(j), g * gs + mm * 4 + c]
                term = t if term is None else term + t
            return te.sum(term, axis=mm)

        return te.compute((spec.top_k, nt, groups, tile), body, name=f"qdot{d}")

    qdots = [qdot(d) for d in range(len(fmt.derived_bits))]
    g = te.reduce_axis((0, groups), "g")

    def y_fn(j, n):
        b, lane = n // tile, n % tile
        e = ids[j]
        zq = code_at(lambda word: zero[e, b, word, lane], g, spec.storage_bits).astype("float32")
        centre = (_pow2(tirx.const(spec.storage_bits, "int32") - prec[e]) - tirx.const(1.0, "float32")) \
            * tirx.const(0.5, "float32")
        planes = None  # only the routed width's accumulator is non-zero (guard_segments)
        for q in qdots:
            planes = q[j, b, g, lane] if planes is None else planes + q[j, b, g, lane]
        return te.sum(scale[e, b, g, lane].astype("float32") * (planes - (zq - centre) * xsum[xrow(j), g]),
                      axis=g)

    y = te.compute((spec.top_k, spec.n), y_fn, name="y")
    return te.create_prim_func([x, *segs, scale, zero, prec, ids, y]).with_attr("global_symbol", "gemv")


def guard_segments(func: tirx.PrimFunc, spec: NestedGemvSpec) -> tirx.PrimFunc:
    """``func`` (scheduled) with each width's update loop under ``prec[expert_ids[j]] == width``.

    The routed-row loops are the top-level parallel loops named from ``j`` (``j`` major, as for
    :func:`moec.lower.kernels.row_guard.guard_routed_rows`); inside them, the first loop of a
    sequence whose subtree holds only block ``qdot{d}_update`` (after ``decompose_reduction``) is
    wrapped, so one specialised inner loop runs per row (a width not served runs none: the
    session refuses such plans before they reach the kernel).
    """
    fmt = spec.format
    need = dict(enumerate(fmt.derived_bits))
    prec, ids = _buffer(func, "prec"), _buffer(func, "expert_ids")
    realize = func.body
    block = realize.block
    stmts = list(block.body.seq) if isinstance(block.body, ts.SeqStmt) else [block.body]
    wrapped = 0
    for t, stmt in enumerate(stmts):
        if isinstance(stmt, ts.For) and stmt.kind == ts.ForKind.PARALLEL and stmt.loop_var.name.startswith("j_"):
            per_row = stmt.extent.value // spec.top_k
            row = stmt.loop_var if per_row == 1 else tirx.floordiv(stmt.loop_var, per_row)
            width = tirx.BufferLoad(prec, [tirx.BufferLoad(ids, [row])])
            body, count = _wrap(stmt.body, {d: width == tirx.const(need[d], "int32") for d in need})
            wrapped += count
            stmts[t] = ts.For(stmt.loop_var, stmt.min, stmt.extent, stmt.kind, body, stmt.thread_binding,
                              stmt.annotations)
    if wrapped != len(need) * sum(
            1 for s in stmts if isinstance(s, ts.For) and s.loop_var.name.startswith("j_")):
        raise MoecError(f"segment guard: found {wrapped} plane loops to guard, expected one per derived width")
    body = ts.SeqStmt(stmts) if len(stmts) > 1 else stmts[0]
    new_block = s_tir.stmt.SBlock(block.iter_vars, block.reads, block.writes, block.name_hint, body,
                                  block.init, block.alloc_buffers, block.match_buffers, block.annotations)
    new_realize = s_tir.stmt.SBlockRealize(realize.iter_values, realize.predicate, new_block)
    return func.with_body(new_realize).with_attr(SEGMENT_GUARD_ATTR, True)


def _buffer(func: tirx.PrimFunc, name: str):
    for param in func.params:
        if param.name == name:
            return param
    raise MoecError(f"nested kernel has no parameter buffer {name!r}")


def _blocks(stmt) -> set[str]:
    """Names of the blocks in ``stmt``'s subtree (loops, sequences, ifs and block realizes)."""
    if isinstance(stmt, s_tir.stmt.SBlockRealize):
        return {stmt.block.name_hint} | _blocks(stmt.block.body)
    if isinstance(stmt, ts.For):
        return _blocks(stmt.body)
    if isinstance(stmt, ts.SeqStmt):
        return set().union(*(_blocks(s) for s in stmt.seq))
    if isinstance(stmt, ts.IfThenElse):
        return _blocks(stmt.then_case) | (_blocks(stmt.else_case) if stmt.else_case is not None else set())
    return set()


def _wrap(stmt, conds: dict[int, tirx.PrimExpr]):
    """Rebuild ``stmt`` with each ``qdot{d}`` update loop (d in ``conds``) under its condition."""
    if isinstance(stmt, ts.SeqStmt):
        out, count = [], 0
        for child in stmt.seq:
            names = _blocks(child)
            hit = [s for s in conds if f"qdot{s}_update" in names and f"qdot{s}_init" not in names]
            if len(hit) == 1 and isinstance(child, ts.For) and len(names) == 1:
                out.append(ts.IfThenElse(conds[hit[0]], child, None))
                count += 1
            else:
                new, c = _wrap(child, conds)
                out.append(new)
                count += c
        return ts.SeqStmt(out), count
    if isinstance(stmt, ts.For):
        body, count = _wrap(stmt.body, conds)
        return ts.For(stmt.loop_var, stmt.min, stmt.extent, stmt.kind, body, stmt.thread_binding,
                      stmt.annotations), count
    return stmt, 0
