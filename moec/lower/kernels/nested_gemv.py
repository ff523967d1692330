"""Decode GEMV over nested (any-precision) expert stacks: each expert's width is a run-time input.

Every routed expert of a layer is stored once, at the nested format's storage width, as bit-plane
segments (``moec.quant.nested``), each in the kernel layout of ``layout.py`` (row-interleaved
uint32 words, tile ``T``). The kernel takes ``prec`` int32 ``[E]``, the width each expert is served
at now, as an ordinary argument: changing it changes what the next call reads, with no rebuild.

For routed row ``j`` with expert ``e = expert_ids[j]`` and width ``k = prec[e]``::

    y[j, n] = sum_g scale[n, g] · ( qdot_k[n, g] − (zero[n, g] − (2**(B−k) − 1) / 2) · xsum[g] )

with ``qdot_k[n, g] = sum_{i in g} (q[n, i] >> (B−k) << (B−k)) · x[i]`` (``B`` the storage width):
the width-``k`` weight of ``moec.quant.nested`` exactly. Block ``qdot{d}`` serves the ``d``-th
derived width with a code path specialised for it at compile time. The segments are in
nibble-lane word order (``layout.nibble_lane_words``: code ``i`` of a group belongs to nibble word
``a = 4(i//32) + i%4``, lane ``(i%32)//4``), so:

- the narrowest width (one segment) multiplies each code where it sits in the segment's word,
  as the fixed kernel does: ``(word & mask << b) · (x[i] · 2**(B−k−b))`` (``xs_plane``);
- a width of up to 4 bits rebuilds nibble word ``a`` (8 codes, each code's top bits in its 4-bit
  lane; block ``word{d}``) with one constant shift per needed segment and one bit select
  ``(A & M) | (B & ~M)`` (``vpternlogd``) per further segment, then multiplies each lane in place
  (``xs_nibble``), the lane mask keeping only the width's bits;
- 8 bits (8-bit storage) rebuilds the top nibble word (each segment's part shifted, masked and
  or-ed) and interleaves it with the low segment's nibble word into two byte words (4 codes
  each) and multiplies each byte in place (``xs_byte``).

The planes a width skips are simply absent from the rebuilt word, which is the truncated code.
The rebuilt words are a block of their own, computed in registers at the unrolled word step, and
each code is a reduction step of its own (``(word & mask) → float → FMA`` into the accumulator):
per code the float work is exactly the fixed kernel's, and the rebuild costs a few integer ops per
8 codes (a single expression summing the 8 products instead cost one extra multiply and add per
word and spilled registers; LLVM, given the codes as separate steps without the block, folded
each lane's mask into the rebuild and rebuilt the word once per code). Each width has a whole loop
nest of its own per parallel task (block ``y{d}``: its group loop, its accumulators, its epilogue
with the bin centre a constant), which :func:`guard_segments` puts under
``if prec[expert_ids[j]] == k_d``: exactly one specialised nest runs per routed row, the width
branch is outside every loop, and the planes a width does not need are never loaded; block ``y``
takes the routed width's rows.
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


def check_lanes(fmt: NestedFormat) -> None:
    """Raise unless the kernel's nibble/byte lanes fit ``fmt``: segments of 1, 2 or 4 bits, every
    width up to 4 bits or 8 bits of 8-bit storage with the top nibble's segments apart from the low one's."""
    positions = segment_positions(fmt)
    ok = all(4 % w == 0 for w in fmt.segment_bits) and all(
        k <= 4 or (k == 8 == fmt.storage_bits) for k in fmt.derived_bits) and all(
        (p >= 4) == (p + w > 4) for p, w in zip(positions, fmt.segment_bits) if fmt.storage_bits == 8)
    if not ok:
        raise MoecError(f"{fmt.name}: the nested kernel needs 1-, 2- or 4-bit segments that split at the nibble")


@dataclass(frozen=True)
class NestedGemvSpec:
    """Shape of one nested GEMV kernel.

    Attributes
    ----------
    storage_bits : int
        A key of ``NESTED_FORMATS``.
    n, k, group_size, num_stacked, top_k, tile, x_per_expert
        As in :class:`moec.lower.kernels.gemv.GemvSpec`.
    swiglu : bool
        The SwiGLU form (int8 kernels only): a second stack of the same shape, ``up``, follows the first
        (``gate``) in the arguments, both read at the routed expert's one width, and ``y`` is
        ``silu(gate x) * (up x)``.
    """

    storage_bits: int
    n: int
    k: int
    group_size: int
    num_stacked: int
    top_k: int
    tile: int
    x_per_expert: bool = False
    swiglu: bool = False

    def __post_init__(self) -> None:
        fmt = get_nested_format(self.storage_bits)
        if self.n < 1 or self.k < 1 or self.num_stacked < 1 or self.top_k < 1 or self.tile < 1:
            raise MoecError(f"bad nested kernel shape n={self.n} k={self.k} experts={self.num_stacked} "
                            f"top_k={self.top_k} tile={self.tile}")
        check_lanes(fmt)
        if self.group_size < 1 or self.k % self.group_size or any(
                self.group_size * w % 32 for w in fmt.segment_bits):
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


def _u32(value: int) -> tirx.PrimExpr:
    return tirx.const(value, "uint32")


def nested_gemv_definition(spec: NestedGemvSpec) -> tirx.PrimFunc:
    """Unscheduled nested GEMV ``y[j, :] = W_{prec[e]}[e] @ x[j or 0]``, ``e = expert_ids[j]``.

    Parameters, in order: ``x`` float32 ``[XR, K]``, one ``seg{s}`` uint32 ``[E, NT, K*w_s/32, T]``
    per segment, ``scale`` float16 ``[E, NT, G, T]``, ``zero`` uint32 ``[E, NT, ZW, T]`` (storage
    width codes), ``prec`` int32 ``[E]``, ``expert_ids`` int32 ``[top_k]``, ``y`` float32
    ``[top_k, N]``. Blocks: ``xsum``, ``xs_plane``/``xs_nibble``/``xs_byte`` (x pre-scaled per code
    position), ``qdot{d}`` and ``y{d}`` (one each per derived width), ``y`` (the routed width's ``y{d}``).
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
    bits, positions = spec.storage_bits, segment_positions(fmt)
    w0 = fmt.segment_bits[0]

    def prescaled(name, exponent):
        """x pre-scaled by the power of two that turns each in-place masked code into its value."""
        return te.compute((xr, spec.k), lambda r, c: x[r, c] * _pow2(exponent(c % 32)), name=name)

    # Code i of a group sits in nibble word a = 4*(i//32) + i%4, lane l = (i%32)//4 (layout.py).
    xs_plane = prescaled("xs_plane", lambda c: bits - w0 - (4 * (c // 4) + w0 * ((c % 4) % (4 // w0))))
    xs_nibble = prescaled("xs_nibble", lambda c: (bits - 4) - 4 * (c // 4))
    xs_byte = prescaled("xs_byte", lambda c: -8 * (c // 8)) if bits == 8 else None
    words = gs // 8  # nibble words per group

    def code_index(a, lane):
        return 32 * (a // 4) + 4 * lane + a % 4

    def nibbles_or(j, b, g, lane, a, segments, offset):
        """Nibble word ``a`` as :func:`nibbles`, each part masked to its bits and or-ed: no stale bits.

        The 8-bit path's form: with bit selects there, LLVM re-associated the selects and the
        even/odd byte masks into per-byte masks (759 instructions a step on x86 against 733)."""
        word = None
        for s in segments:
            width, per = fmt.segment_bits[s], 4 // fmt.segment_bits[s]
            raw = segs[s][ids[j], b, g * (gs * width // 32) + a // per, lane]
            part = ((raw >> (width * (a % per)).astype("uint32")) & _u32(((1 << width) - 1) * 0x11111111)) \
                << _u32(positions[s] - offset)
            word = part if word is None else word | part
        return word

    def nibbles(j, b, g, lane, a, segments, offset):
        """Nibble word ``a``: each segment's part at bit ``pos_s - offset`` of its 4-bit lane.

        Each segment word is shifted once (the part's bit in the stored word to its bit in the
        lane) and the parts are merged by bit selects ``(A & M) | (B & ~M)`` (one ``vpternlogd``
        each), most significant segment last: every lane bit at or above the lowest segment's
        holds its part, bits below it may hold other nibble words' bits (the caller's lane mask
        drops them)."""
        word = None
        for s in reversed(list(segments)):
            width, per = fmt.segment_bits[s], 4 // fmt.segment_bits[s]
            raw = segs[s][ids[j], b, g * (gs * width // 32) + a // per, lane]
            shift = (positions[s] - offset) - width * (a % per)  # constant once the word loop is unrolled
            part = (raw << tirx.max(shift, 0).astype("uint32")) >> tirx.max(-shift, 0).astype("uint32")
            if word is None:
                word = part
            else:
                keep = _u32((((1 << width) - 1) * 0x11111111 << (positions[s] - offset)) & 0xFFFFFFFF)
                word = (part & keep) | (word & ~keep)
        return word

    def rebuilt(d):
        """Block ``word{d}``: the words width ``derived_bits[d]`` multiplies in place, one per nibble
        word ``a`` (``[.., a, 0, lane]``: up to 4 bits), or its even and odd byte words
        (``[.., a, h, lane]``: 8 bits). A block of its own (computed at the unrolled word step,
        in registers), so each word is rebuilt once and its 8 codes share it."""
        if fmt.derived_bits[d] <= 4:
            return te.compute((spec.top_k, nt, groups, words, 1, tile),
                              lambda j, b, g, a, h, lane: nibbles(j, b, g, lane, a, range(d + 1), bits - 4),
                              name=f"word{d}")
        high = [s for s in range(d + 1) if positions[s] >= 4]
        low_segs = [s for s in range(d + 1) if s not in high]

        def fn(j, b, g, a, h, lane):  # byte c of the even (odd) word: code lane 2c (2c + 1)
            top = nibbles_or(j, b, g, lane, a, high, 4)
            low = nibbles_or(j, b, g, lane, a, low_segs, 0)
            even = ((top & _u32(0x0F0F0F0F)) << _u32(4)) | (low & _u32(0x0F0F0F0F))
            odd = (top & _u32(0xF0F0F0F0)) | ((low >> _u32(4)) & _u32(0x0F0F0F0F))
            return tirx.Select(h == 0, even, odd)

        return te.compute((spec.top_k, nt, groups, words, 2, tile), fn, name=f"word{d}")

    def qdot(d):
        """Width ``derived_bits[d]`` over the group's codes, one specialised form per kind of width.

        - one segment (the narrowest width): each code is multiplied where it sits in the
          segment's word, as the fixed kernel of that width does (a reduction over codes);
        - up to 4 bits: the needed segments or-ed into nibble words (8 codes, the code's top
          bits in each 4-bit lane), multiplied in place;
        - 8 bits (8-bit storage): the top nibble word and the low segment's nibble word
          interleaved into two byte words (4 codes each), multiplied in place.
        """
        k = fmt.derived_bits[d]
        unit = te.reduce_axis((0, gs if d == 0 else words), f"u{d}")  # codes, or nibble words
        # Codes of a rebuilt word, a reduce axis of their own: 8 nibble lanes (up to 4 bits) or
        # lane 2c + h = byte c of the even (h = 0) or odd byte word (8 bits). So every code is
        # one (mask, convert, FMA) into the accumulator, as in the fixed kernel.
        lanes = te.reduce_axis((0, 8), f"c{d}") if d else None
        word = rebuilt(d) if d else None

        def body(j, bb, g, lane):
            row = xrow(j)
            if d == 0:  # code i = 32*W + 4*l + r, r = rq*per + rp: word W*w0 + rq, bit 4*l + w0*rp
                per = 4 // w0
                r = unit % 4
                raw = segs[0][ids[j], bb, g * (gs * w0 // 32) + (unit // 32) * w0 + r // per, lane]
                bit = (4 * ((unit % 32) // 4) + w0 * (r % per)).astype("uint32")
                code = (raw & (_u32((1 << w0) - 1) << bit)).astype("float32")
                return te.sum(code * xs_plane[row, g * gs + unit], axis=unit)
            if k <= 4:
                mask = ((1 << k) - 1) << (4 - k)  # the width's bits of the lane (the rest may be stale)
                code = (word[j, bb, g, unit, 0, lane] & (_u32(mask) << (4 * lanes).astype("uint32")))
                return te.sum(code.astype("float32") * xs_nibble[row, g * gs + code_index(unit, lanes)],
                              axis=[unit, lanes])
            code = word[j, bb, g, unit, lanes % 2, lane] & (_u32(0xFF) << (8 * (lanes // 2)).astype("uint32"))
            return te.sum(code.astype("float32") * xs_byte[row, g * gs + code_index(unit, lanes)],
                          axis=[unit, lanes])

        return te.compute((spec.top_k, nt, groups, tile), body, name=f"qdot{d}")

    def out(d):
        """Block ``y{d}``: the rows served at width ``derived_bits[d]``, from ``qdot{d}`` alone (the bin
        centre a constant): ``sum_g scale · (qdot_k − (zero − (2**(B−k) − 1)/2) · xsum)``."""
        q, g = qdot(d), te.reduce_axis((0, groups), "g")
        centre = tirx.const((2 ** (spec.storage_bits - fmt.derived_bits[d]) - 1) / 2, "float32")

        def fn(j, n):
            b, lane = n // tile, n % tile
            e = ids[j]
            zq = code_at(lambda word: zero[e, b, word, lane], g, spec.storage_bits).astype("float32")
            sums = q[j, b, g, lane] - (zq - centre) * xsum[xrow(j), g]
            return te.sum(scale[e, b, g, lane].astype("float32") * sums, axis=g)

        return te.compute((spec.top_k, spec.n), fn, name=f"y{d}")

    outs = [out(d) for d in range(len(fmt.derived_bits))]

    def y_fn(j, n):  # the routed row's width picks its block (only that one was computed: guard_segments)
        width = prec[ids[j]]
        value = outs[-1][j, n]
        for d in reversed(range(len(outs) - 1)):
            value = tirx.Select(width == fmt.derived_bits[d], outs[d][j, n], value)
        return value

    y = te.compute((spec.top_k, spec.n), y_fn, name="y")
    return te.create_prim_func([x, *segs, scale, zero, prec, ids, y]).with_attr("global_symbol", "gemv")


def guard_segments(func: tirx.PrimFunc, spec: NestedGemvSpec) -> tirx.PrimFunc:
    """``func`` (scheduled) with each width's loop nest under ``prec[expert_ids[j]] == width``.

    The routed-row loops are the top-level parallel loops named from ``j`` (``j`` major, as for
    :func:`moec.lower.kernels.row_guard.guard_routed_rows`); inside them, the outermost loop whose
    subtree holds only width ``d``'s blocks (``y{d}``, ``qdot{d}``, ``word{d}``: inits and updates)
    is wrapped, so one specialised loop nest runs per routed row and task, its branch outside every
    loop (a width not served runs none: the session refuses such plans before they reach the
    kernel; ``y`` then selects the routed width's rows).
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
        raise MoecError(f"segment guard: found {wrapped} width loop nests to guard, expected one per derived width")
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


def _width_blocks(d: int) -> set[str]:
    """Names of the blocks of width ``d``'s loop nest (after ``decompose_reduction``)."""
    return {f"y{d}_init", f"y{d}_update", f"qdot{d}_init", f"qdot{d}_update", f"word{d}"}


def _wrap(stmt, conds: dict[int, tirx.PrimExpr]):
    """Rebuild ``stmt`` with each width ``d``'s loop nest (d in ``conds``) under its condition."""
    if isinstance(stmt, ts.SeqStmt):
        out, count = [], 0
        for child in stmt.seq:
            names = _blocks(child)
            hit = [d for d in conds if names and names <= _width_blocks(d)]
            if hit and isinstance(child, ts.For) and f"qdot{hit[0]}_update" in names:
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
