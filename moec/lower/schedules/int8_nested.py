"""Decode GEMV over nested (any-precision) expert stacks with int8 activations, for any ISA with a 4-byte dot.

The int8-activation counterpart of :mod:`moec.lower.kernels.nested_gemv`: same arguments (``x``
float32, ``seg{s}``, ``scale``, ``zero``, ``prec``, ``expert_ids``, ``y``), same layout
(:func:`moec.lower.kernels.layout.nested_kernel_layout`), ``x`` quantized per group as the fixed
int8 GEMVs quantize it (:func:`moec.lower.kernels.activations.quantize_activations`). Explicit TIR
(``tensorize`` crashes in this TVM); what differs per ISA is a :class:`DotIsa`: the vector width,
the 4-byte dot instruction and whether it takes the codes as unsigned or signed bytes
(``x86_vnni_nested``: ``vpdpbusd``, unsigned; ``arm_dotprod_nested``: ``sdot``, signed).

Per parallel task (a routed row ``j`` and ``vecs`` vectors of ``lanes`` rows) the width ``k = prec[e]``
picks one loop nest, specialised for ``k`` at compile time, so the planes ``k`` skips are never
loaded. A step is one *nibble word* ``a`` of a group (8 codes per row, one per 4-bit lane,
``moec.lower.kernels.nested_layout``), rebuilt in registers from the needed segment words:

- ``k <= 4``: the needed segments are merged into the nibble word (a constant shift per part,
  a bit select per further one: :func:`nibbles`; two adjacent 1-bit segments are one 2-bit part,
  built once a chunk: :func:`pair_word`), each lane holding ``q_k << (4 − k)`` (bits below may be
  stale); ``word & M`` puts lanes 0,2,4,6 one per byte, and lanes 1,3,5,7 either in place
  (``word & (M << 4)``, unsigned dots: their chain sums 16 × the products and is shifted right by 4
  once a group) or shifted down (``(word >> 4) & M``; at 3 and 4 bits one ``vgf2p8affineqb`` where the ISA has
  GFNI: :attr:`DotIsa.nibble_down`; signed dots, where a high nibble would read as negative, and the one-chain
  blocks of ``task_vectors``, where both halves share an accumulator); two dots multiply them by 4 int8
  activations each;
- ``k = 8`` (8-bit storage): the top nibble word (segments 2+1+1) and the low segment's word are
  interleaved into two byte words of whole codes (two bit selects), then two dots; signed dots take
  the codes recentred to ``q − 128`` (``^ 0x80``) and the zero point shifted to match, as the fixed
  ARM kernel does.

The SwiGLU form (``spec.swiglu``) takes a second stack, the up projection's, after the first (the gate's): a
task computes its tile's rows of the gate, then the same rows of the up at the same width (one width table
per layer), and writes ``silu(gate) * up`` (``rowwise.fast_silu``), as the fixed int8 SwiGLU GEMV does: one
call and no intermediate rows instead of two GEMVs and an element-wise op.

An ISA whose dot is two instructions (:attr:`DotIsa.pairs`, AVX2: ``vpmaddubsw`` to int16 pairs, then
``vpmaddwd``) takes every width as code bytes 0..15 and adds a chunk's first steps in int16 before one
second step (8 pair sums of at most ``2·15·127`` a lane: exact); its 8-bit codes are two nibble sums,
the rebuilt top nibbles and the low segment's, widened times 16 and 1, so they are never recentred.

So the integer sum ``D`` of a group is ``sum (q_k << (4 − k)) · x8`` (``k = 8``: ``sum q · x8``),
exact; the group term is, with ``s = B − k`` (``B`` the storage width) and the bin centre
``(2**s − 1) / 2`` of :mod:`moec.quant.nested`::

    scale · sx · (D·2**(B−4) − (zero − (2**s − 1)/2) · xsum)    (k = B: scale · sx · (D − zero · xsum))

evaluated as ``scale · sx · 0.5 · float(2·D·2**(B−4) − (2·zero − 2**s + 1) · xsum)`` in int32 (exact),
and for ``k = B`` exactly as the fixed int8 kernel's group term, so the stored width is bit-identical
to a fixed bundle of the same codes.
"""

# No `from __future__ import annotations`: TVMScript needs the evaluated buffer annotations.

from math import gcd

from tvm import tirx
from tvm.script import tirx as T

from moec.core.errors import MoecError
from moec.lower.kernels.decode import code_at
from moec.lower.kernels.layout import num_tiles, zero_words
from moec.lower.kernels.nested_gemv import NestedGemvSpec
from moec.lower.kernels.rowwise import fast_silu
from moec.lower.kernels.scopes import stack_scope
from moec.lower.kernels.signature import UNUSED, drop_params, segment_names
from moec.lower.schedules.int8_common import (DotIsa, claim, claim_lanes, lane_task, quantize_activations_prep, splat,
                                              unclaimed)
from moec.quant.nested import segment_positions


def _shift(raw, shift: int, lanes: int):
    return raw << splat(shift, lanes) if shift > 0 else (raw >> splat(-shift, lanes) if shift < 0 else raw)


def slot_source(slot: int) -> int:
    """Within 32 codes (4 nibble words), the code whose activation is at slot ``slot`` of ``x8``.

    Slots ``8a' .. 8a'+3`` are nibble word ``a'``'s even lanes 0,2,4,6 (the first dot),
    ``8a'+4 .. 8a'+7`` its odd lanes 1,3,5,7; lane ``l`` of nibble word ``a'`` is code ``4l + a'``.
    """
    a, c = slot // 8, slot % 8  # ints or TIR expressions (the prep's unrolled slot loop)
    return 4 * (2 * (c % 4) + c // 4) + a


def nibble_parts(fmt, segments) -> list[tuple[int, ...]]:
    """The parts :func:`nibbles` merges: each needed segment ``(s,)``, except that two adjacent 1-bit
    segments both needed become one 2-bit *pair* part ``(s, s + 1)`` (:func:`pair_word`)."""
    segments, parts, i = list(segments), [], 0
    while i < len(segments):
        s = segments[i]
        if (i + 1 < len(segments) and segments[i + 1] == s + 1 and fmt.segment_bits[s] == 1
                and fmt.segment_bits[s + 1] == 1):
            parts.append((s, s + 1))
            i += 2
        else:
            parts.append((s,))
            i += 1
    return parts


def pair_word(isa: DotIsa, load, s: int, a: int):
    """The 2-bit parts of nibble words ``a % 2`` (bits 1-0 of each lane) and ``a % 2 + 2`` (bits 3-2) from
    the 1-bit segments ``s`` (the high bit of each pair) and ``s + 1``, whose chunk words hold nibble word
    ``a``'s bit at bit ``a`` of each lane: one shift and one select a word, two words a chunk, shared
    by its four nibble words (every bit exact). Three shifts and three selects fewer a chunk than
    shifting each 1-bit part into place per nibble word."""
    hi, lo = load(s, 0), load(s + 1, 0)
    if a % 2 == 0:  # bit 2j+1 <- hi bit 2j, bit 2j <- lo bit 2j (j = 0, 1): words 0 and 2
        return isa.select(hi << splat(1, isa.lanes), lo, 0xAAAAAAAA)
    return isa.select(hi, lo >> splat(1, isa.lanes), 0xAAAAAAAA)  # words 1 and 3


def nibbles(isa: DotIsa, fmt, load, a: int, segments, offset: int):
    """Nibble word ``a`` (constant within its 4-word chunk) from ``segments``: each part shifted to
    bit ``pos − offset`` of its lane, merged by bit selects, most significant last (bits below
    the lowest part's may be stale). ``load(s, word)`` is the segment's word of the chunk; adjacent
    1-bit segments are read as one 2-bit part (:func:`nibble_parts`, :func:`pair_word`)."""
    positions = segment_positions(fmt)
    word = None
    for part_of in reversed(nibble_parts(fmt, segments)):
        pos = positions[part_of[-1]]  # the part's lowest bit in the code
        if len(part_of) == 2:
            width, raw, inner = 2, pair_word(isa, load, part_of[0], a), 2 * (a // 2)
        else:
            width = fmt.segment_bits[part_of[0]]
            per = 4 // width
            raw, inner = load(part_of[0], a // per), width * (a % per)
        part = _shift(raw, (pos - offset) - inner, isa.lanes)
        if word is None:
            word = part
        else:
            keep = (((1 << width) - 1) * 0x11111111 << (pos - offset)) & 0xFFFFFFFF
            word = isa.select(part, word, keep)
    return word


def byte_words(isa: DotIsa, fmt, d: int, load, a: int, odd_in_place: bool | None = None):
    """(even, odd) uint32 words of nibble word ``a`` at derived width ``d``: one code per byte, as the
    ISA's dot reads them. Up to 4 bits the odd lanes stay in place (16 × their value) when
    ``odd_in_place`` (default: the ISA's dot reads unsigned codes), else they are shifted down."""
    k, bits, lanes = fmt.derived_bits[d], fmt.storage_bits, isa.lanes
    if odd_in_place is None:
        odd_in_place = isa.unsigned_codes
    if k <= 4:
        word = nibbles(isa, fmt, load, a, range(d + 1), bits - 4)
        mask = (((1 << k) - 1) << (4 - k)) * 0x01010101
        if odd_in_place:  # (at most 0xF0: still an unsigned byte), 16 × their products
            return word & splat(mask, lanes), word & splat(mask << 4, lanes)
        # (at 2 bits, whose rebuild is one shift, vgf2p8affineqb measured no faster: a shift and an and there)
        return word & splat(mask, lanes), isa.high_nibbles(word, mask, plain=k == 2)
    positions = segment_positions(fmt)
    high = [s for s in range(d + 1) if positions[s] >= 4]
    low = [s for s in range(d + 1) if positions[s] < 4]
    if len(low) != 1 or fmt.segment_bits[low[0]] != 4 or positions[low[0]] != 0:
        raise MoecError(f"{fmt.name}: the int8 nested kernel needs one 4-bit low segment for 8 bits")
    top = nibbles(isa, fmt, load, a, high, 4)
    bottom = load(low[0], a)
    even = isa.select(top << splat(4, lanes), bottom, 0xF0F0F0F0)
    odd = isa.select(top, bottom >> splat(4, lanes), 0xF0F0F0F0)
    if not isa.unsigned_codes:  # q - 128 as a signed byte
        return even ^ splat(0x80808080, lanes), odd ^ splat(0x80808080, lanes)
    return even, odd


def nested_group_term(isa: DotIsa, bits: int, width: int, dot, scale, zero, sx, xsum, e, t, col, g, r,
                      recentred: bool | None = None):
    """Group ``g``'s term of column ``col`` of tile ``t`` at derived ``width`` of ``bits``-bit storage, from its
    integer sum ``dot`` (``sum (q_k << (4 − k)) · x8`` up to 4 bits, ``sum q · x8`` at 8) over row ``r``'s
    activations (the module docstring's formula; the stored width exactly the fixed int8 kernel's term).
    ``recentred``: the 8-bit codes were dotted as ``q − 128`` (:func:`byte_words` on a signed-code ISA); default:
    as the nested GEMV dots them (recentred on signed one-step dots; int16 sums split them into nibbles)."""
    zq = T.Cast("int32", code_at(lambda word: zero[e, t, word, col], g, bits))
    s = T.Cast("float32", scale[e, t, g, col]) * sx[r, g]
    shift = bits - width
    if recentred is None:
        recentred = not isa.unsigned_codes and isa.pairs is None
    if shift == 0:  # the stored width: the fixed int8 kernel's group term exactly
        if width == 8 and recentred:
            zq = zq - 128  # the codes were recentred
        return s * T.Cast("float32", dot - zq * xsum[r, g])
    full = dot * (1 << (bits - 4)) if width <= 4 else dot
    twice = full * 2 - (zq * 2 - ((1 << shift) - 1)) * xsum[r, g]
    return s * T.float32(0.5) * T.Cast("float32", twice)


def segment_chunk_loader(segs, fmt, gs: int, lanes: int, tile: int, e, gv, g, ch):
    """``load(s, word)``: word ``word`` of segment ``s`` within chunk ``ch`` (32 codes) of group ``g`` of vector
    ``gv`` (``lanes`` rows of ``tile``-row layout tiles) of expert ``e``, ``segs`` the stack's segment buffers."""
    seg_words = [gs * w // 32 for w in fmt.segment_bits]  # words per group, per segment
    chunks = gs // 32

    def load(s, word):
        return segs[s][e, gv * lanes // tile, g * seg_words[s] + ch * (seg_words[s] // chunks) + word,
                       T.ramp(gv * lanes % tile, 1, lanes)]
    return load


def check_int8_nested(spec: NestedGemvSpec, isa: DotIsa, tile_vectors: int) -> None:
    """One-line refusal of a shape this kernel cannot take."""
    if spec.tile % isa.lanes or spec.n % isa.lanes:
        raise MoecError(f"the int8 nested GEMV needs N ({spec.n}) and the layout tile ({spec.tile}) to be "
                        f"multiples of {isa.lanes}")
    if spec.group_size % 32:
        raise MoecError(f"the int8 nested GEMV needs group_size ({spec.group_size}) a multiple of 32")
    if tile_vectors < 1:
        raise MoecError(f"bad tile_vectors {tile_vectors}")


def task_blocks(tile: int, lanes: int, vecs: int) -> int:
    """Register blocks of ``vecs`` vectors per task: as many as make one whole layout tile when the tile
    holds more than one block (a task then reads its tile's rows of every segment contiguously, block
    after block within each group), else 1."""
    per_tile = tile // lanes
    return per_tile // vecs if per_tile > vecs and per_tile % vecs == 0 else 1


def int8_nested_gemv(spec: NestedGemvSpec, isa: DotIsa, vecs: int, task_vectors: int = 0,
                     block_vectors: int = 0, eight_one_chain: bool = False,
                     word_order: tuple[int, ...] = ()) -> tirx.PrimFunc:
    """The int8-activation nested GEMV for ``spec`` on ``isa``: register blocks of ``vecs`` vectors of rows,
    a task one block or, on a layout tile of several blocks, the whole tile (:func:`task_blocks`).

    ``task_vectors`` (a multiple of ``2 * vecs``, or ``vecs`` itself; 0: as above): vectors per task, in register
    blocks one after another, each over the whole K: up to 4 bits (and at 8 with ``eight_one_chain``) blocks of
    ``block_vectors`` vectors of one chain (odd lanes shifted down, so both halves of a nibble word sum in one
    accumulator; 8-bit byte words are whole codes; 0: ``2 * vecs``, at most the task's), else 8 bits blocks of
    ``vecs`` vectors of two chains. ``word_order``: widths whose one-chain blocks step nibble word by nibble
    word across the block's vectors (else vector by vector, each vector's four words of a chunk together)."""
    fmt, bits, lanes = spec.format, spec.storage_bits, isa.lanes
    check_int8_nested(spec, isa, vecs)
    if task_vectors and (task_vectors % (2 * vecs) and task_vectors != vecs or isa.pairs is not None):
        raise MoecError(f"internal: task_vectors {task_vectors} is neither {vecs} nor a multiple of {2 * vecs}, "
                        "or the ISA sums pairs")
    if isa.pairs is not None and isa.unsigned_codes:
        raise MoecError("internal: int16 pair sums need code bytes shifted down (a signed-code DotIsa)")
    n, k, gs, tile, top_k, experts = spec.n, spec.k, spec.group_size, spec.tile, spec.top_k, spec.num_stacked
    groups, nb = k // gs, n // lanes
    tvecs = task_vectors or task_blocks(tile, lanes, vecs) * vecs  # vectors per task
    one_chain = min(tvecs, block_vectors or 2 * vecs)  # vectors a one-chain block (task_vectors, up to 4 bits)
    if task_vectors and (tvecs % one_chain or one_chain > 2 * vecs):
        raise MoecError(f"internal: block_vectors {block_vectors} does not divide task_vectors {task_vectors} "
                        f"or exceeds the {2 * vecs} accumulators")
    tiles = -(-nb // tvecs)
    chunks = gs // 32  # 4 nibble words (32 codes) per chunk
    xr = top_k if spec.x_per_expert else 1
    xstride = 1 if spec.x_per_expert else 0
    nt, zw = num_tiles(n, tile), zero_words(groups, bits)
    prep = quantize_activations_prep(xr, k, gs, gcd(gs, lanes), 32, slot_source)
    widths = fmt.derived_bits
    ntask = top_k * tiles
    task_lanes = claim_lanes(ntask, isa.claim_lanes)  # 0: TVM's static split
    claim_tiles = tiles if isa.expert_major_claims else 0  # claims expert-major (int8_common: claim order)
    claim_words = -(-ntask // 32)
    nseg = len(fmt.segment_bits)

    def group_dot(even, odd, d):
        """The group's ``D`` from the two chains: up to 4 bits an odd chain masked in place holds 16 × its
        products (multiples of 16: the shift is exact)."""
        return even + (odd >> 4) if widths[d] <= 4 and isa.unsigned_codes else even + odd

    def group_term(dot, scale, zero, sx, xsum, e, gv, g, lane, r, d):
        return nested_group_term(isa, bits, widths[d], dot, scale, zero, sx, xsum, e, gv * lanes // tile,
                                 gv * lanes % tile + lane, g, r)

    def chunk_loader(segs, e, gv, g, ch):
        return segment_chunk_loader(segs, fmt, gs, lanes, tile, e, gv, g, ch)

    def x4_of(x8, r, g, ch, a: int, half: int):
        """The 4 activations of nibble word ``a``'s even (``half`` 0) or odd lanes, broadcast to every row."""
        return T.reinterpret(f"int8x{4 * lanes}", T.Broadcast(
            T.reinterpret("int32", x8[r, T.ramp(g * gs + ch * 32 + 8 * a + 4 * half, 1, 4)]), lanes))

    def block_shape(d) -> tuple[int, int]:
        """(vectors a register block, chains a vector) of width ``d``'s nest."""
        return (one_chain, 1) if task_vectors and (widths[d] <= 4 or eight_one_chain) else (vecs, 2)

    def make_clear(rows: int):
        @T.macro
        def clear(acc):
            for a in T.unroll(rows):
                for lane in T.vectorized(lanes):
                    acc[a, lane] = 0
        return clear

    clear = make_clear(2 * vecs)

    def make_add_terms(d):
        bv, chains = block_shape(d)

        @T.macro
        def add_terms(scale, zero, sx, xsum, yacc, acc, e, task, r, g, b):
            """Group ``g``'s scaled sums of block ``b``'s vectors into ``yacc`` (the two chains of a vector added)."""
            for v in T.unroll(bv):
                if task // top_k * tvecs + b * bv + v < nb:
                    for lane in T.vectorized(lanes):
                        yacc[b * bv + v, lane] = yacc[b * bv + v, lane] + group_term(
                            acc[v, lane] if chains == 1 else group_dot(acc[2 * v, lane], acc[2 * v + 1, lane], d),
                            scale, zero, sx, xsum, e, task // top_k * tvecs + b * bv + v, g, lane, r, d)
        return add_terms

    def make_nest(d):
        if isa.pairs is not None:
            return make_pair_nest(d)
        add_terms = make_add_terms(d)

        def step(segs, x8, acc, e, gv, g, ch, r, a: int, half: int):
            """Chain ``half`` (0: even lanes, 1: odd) of the accumulator after nibble word ``a`` of chunk
            ``ch`` of group ``g``. The two chains of a word are consecutive statements (the same rebuild
            expression, which LLVM computes once): a chain per word, not per chunk, keeps one word's
            temporaries live at a time (chunk-long chains spilled 260-590 vectors on x86)."""
            codes = byte_words(isa, fmt, d, chunk_loader(segs, e, gv, g, ch), a)[half]
            return isa.dot(acc, codes, x4_of(x8, r, g, ch, a, half))

        if block_shape(d)[1] == 1:
            return make_one_chain_nest(d, add_terms)
        blocks = tvecs // vecs

        @T.macro
        def chain_step(segs, x8, acc, e, gv, g, ch, r, v, a: int, half: int):
            """Chain ``half`` of vector ``v`` (global vector ``gv``) after nibble word ``a`` of chunk ``ch``."""
            acc[2 * v + half, T.ramp(0, 1, lanes)] = step(segs, x8, acc[2 * v + half, T.ramp(0, 1, lanes)], e, gv, g,
                                                          ch, r, a, half)

        @T.macro
        def block_group(segs, scale, zero, sx, xsum, x8, yacc, acc, e, task, r, g, b):
            """Group ``g`` of register block ``b``: its chains cleared, stepped over the group's chunks, added to ``yacc``."""
            # (the vector index is spelled out in each statement: naming it with a let variable made
            # LLVM spill 13-38 vectors a chunk instead of 4-13 on x86)
            clear(acc)
            for ch in range(chunks):
                for v in T.unroll(vecs):
                    if task // top_k * tvecs + b * vecs + v < nb:  # (a word index and a half are Python ints)
                        chain_step(segs, x8, acc, e, task // top_k * tvecs + b * vecs + v, g, ch, r, v, 0, 0)
                        chain_step(segs, x8, acc, e, task // top_k * tvecs + b * vecs + v, g, ch, r, v, 0, 1)
                        chain_step(segs, x8, acc, e, task // top_k * tvecs + b * vecs + v, g, ch, r, v, 1, 0)
                        chain_step(segs, x8, acc, e, task // top_k * tvecs + b * vecs + v, g, ch, r, v, 1, 1)
                        chain_step(segs, x8, acc, e, task // top_k * tvecs + b * vecs + v, g, ch, r, v, 2, 0)
                        chain_step(segs, x8, acc, e, task // top_k * tvecs + b * vecs + v, g, ch, r, v, 2, 1)
                        chain_step(segs, x8, acc, e, task // top_k * tvecs + b * vecs + v, g, ch, r, v, 3, 0)
                        chain_step(segs, x8, acc, e, task // top_k * tvecs + b * vecs + v, g, ch, r, v, 3, 1)
            add_terms(scale, zero, sx, xsum, yacc, acc, e, task, r, g, b)

        if task_vectors:  # a task's blocks one after another, each over the whole K
            @T.macro
            def nest(segs, scale, zero, sx, xsum, x8, yacc, acc, e, task, r):
                for b in range(blocks):
                    for g in range(groups):
                        block_group(segs, scale, zero, sx, xsum, x8, yacc, acc, e, task, r, g, b)
            return nest

        @T.macro
        def nest(segs, scale, zero, sx, xsum, x8, yacc, acc, e, task, r):
            for g in range(groups):
                for b in range(blocks):  # a whole tile's register blocks, one after another
                    block_group(segs, scale, zero, sx, xsum, x8, yacc, acc, e, task, r, g, b)

        return nest

    def make_one_chain_nest(d, add_terms):
        """Width ``d``'s nest in blocks of ``one_chain`` vectors, one after another, each over the whole K, one
        chain a vector: up to 4 bits a nibble word's odd lanes shifted down, so both halves are ``q_k << (4 − k)``;
        at 8 bits both byte words hold whole codes. A chunk steps vector by vector (each vector's four words
        together: the 4-bit rebuild's pair words are then live for one vector at a time) or, for widths in
        ``word_order``, word by word across the block's vectors (each segment word row read across its vectors
        before the next)."""
        bv = block_shape(d)[0]
        clear_one = make_clear(bv)
        by_word = widths[d] in word_order

        def word(segs, x8, acc, e, gv, g, ch, r, a: int):
            even, odd = byte_words(isa, fmt, d, chunk_loader(segs, e, gv, g, ch), a, odd_in_place=False)
            return isa.dot(isa.dot(acc, even, x4_of(x8, r, g, ch, a, 0)), odd, x4_of(x8, r, g, ch, a, 1))

        @T.macro
        def chain_word(segs, x8, acc, e, gv, g, ch, r, v, a: int):
            """Vector ``v``'s chain (global vector ``gv``) after nibble word ``a`` of chunk ``ch``."""
            acc[v, T.ramp(0, 1, lanes)] = word(segs, x8, acc[v, T.ramp(0, 1, lanes)], e, gv, g, ch, r, a)

        @T.macro
        def word_across(segs, x8, acc, e, task, g, ch, r, b, a: int):
            """Nibble word ``a`` of chunk ``ch`` into the chain of each of the block's vectors."""
            for v in T.unroll(bv):
                if task // top_k * tvecs + b * bv + v < nb:
                    chain_word(segs, x8, acc, e, task // top_k * tvecs + b * bv + v, g, ch, r, v, a)

        @T.macro
        def chunk_words(segs, x8, acc, e, task, g, ch, r, b):
            """The block's chain words of chunk ``ch``, nibble word by nibble word across its vectors."""
            word_across(segs, x8, acc, e, task, g, ch, r, b, 0)
            word_across(segs, x8, acc, e, task, g, ch, r, b, 1)
            word_across(segs, x8, acc, e, task, g, ch, r, b, 2)
            word_across(segs, x8, acc, e, task, g, ch, r, b, 3)

        @T.macro
        def chunk_vectors(segs, x8, acc, e, task, g, ch, r, b):
            """The block's chain words of chunk ``ch``, vector by vector."""
            for v in T.unroll(bv):
                if task // top_k * tvecs + b * bv + v < nb:  # (a word index is a Python int)
                    chain_word(segs, x8, acc, e, task // top_k * tvecs + b * bv + v, g, ch, r, v, 0)
                    chain_word(segs, x8, acc, e, task // top_k * tvecs + b * bv + v, g, ch, r, v, 1)
                    chain_word(segs, x8, acc, e, task // top_k * tvecs + b * bv + v, g, ch, r, v, 2)
                    chain_word(segs, x8, acc, e, task // top_k * tvecs + b * bv + v, g, ch, r, v, 3)

        chunk = chunk_words if by_word else chunk_vectors

        @T.macro
        def nest(segs, scale, zero, sx, xsum, x8, yacc, acc, e, task, r):
            for b in range(tvecs // bv):
                for g in range(groups):
                    clear_one(acc)
                    for ch in range(chunks):
                        chunk(segs, x8, acc, e, task, g, ch, r, b)
                    add_terms(scale, zero, sx, xsum, yacc, acc, e, task, r, g, b)

        return nest

    def make_pair_nest(d):
        """The nest of width ``d`` on an ISA with two-step dots (:attr:`DotIsa.pairs`, AVX2): per chunk and
        vector, the first steps of all its dots add up in int16 (every code byte 0..15, at most 8 pair
        sums of ``2·15·127`` a lane: exact) and one second step widens them to int32. Up to 4 bits one
        int16 sum holds both halves of the 4 nibble words; at 8 bits the top nibbles (the rebuilt
        high segments) and the low segment's nibbles are two sums, widened times 16 and 1, so 8-bit
        codes need no recentring (``16·high + low`` is the code)."""
        eight = widths[d] == 8
        positions = segment_positions(fmt)
        high = [s for s in range(d + 1) if positions[s] >= 4]
        low = [s for s in range(d + 1) if positions[s] < 4]
        if eight and (len(low) != 1 or fmt.segment_bits[low[0]] != 4 or positions[low[0]] != 0):
            raise MoecError(f"{fmt.name}: the int8 nested kernel needs one 4-bit low segment for 8 bits")
        pairs, m = isa.pairs, splat(0x0F0F0F0F, lanes)
        add_terms = make_add_terms(d)  # (the second chain, acc[2v + 1], stays 0 here)

        def word_pairs(segs, x8, e, gv, g, ch, r, a: int, part: int):
            """int16 pair sums of nibble word ``a`` of chunk ``ch``: ``part`` 0 the codes (8 bits: their top
            nibbles), 1 the low nibbles of 8-bit codes."""
            load = chunk_loader(segs, e, gv, g, ch)
            if not eight:
                even, odd = byte_words(isa, fmt, d, load, a)
            else:
                word = nibbles(isa, fmt, load, a, high, 4) if part == 0 else load(low[0], a)
                even, odd = word & m, (word >> splat(4, lanes)) & m
            return pairs(even, x4_of(x8, r, g, ch, a, 0)) + pairs(odd, x4_of(x8, r, g, ch, a, 1))

        @T.macro
        def nest(segs, scale, zero, sx, xsum, x8, yacc, acc, e, task, r):
            acc16 = T.alloc_buffer((2 * vecs, 2 * lanes), "int16", scope=stack_scope(2 * vecs * lanes * 4))
            for g in range(groups):
                for b in range(tvecs // vecs):
                    clear(acc)
                    for ch in range(chunks):
                        for v in T.unroll(vecs):
                            if task // top_k * tvecs + b * vecs + v < nb:
                                acc16[2 * v, T.ramp(0, 1, 2 * lanes)] = word_pairs(
                                    segs, x8, e, task // top_k * tvecs + b * vecs + v, g, ch, r, 0, 0)
                                acc16[2 * v, T.ramp(0, 1, 2 * lanes)] = acc16[2 * v, T.ramp(0, 1, 2 * lanes)] + word_pairs(
                                    segs, x8, e, task // top_k * tvecs + b * vecs + v, g, ch, r, 1, 0)
                                acc16[2 * v, T.ramp(0, 1, 2 * lanes)] = acc16[2 * v, T.ramp(0, 1, 2 * lanes)] + word_pairs(
                                    segs, x8, e, task // top_k * tvecs + b * vecs + v, g, ch, r, 2, 0)
                                acc16[2 * v, T.ramp(0, 1, 2 * lanes)] = acc16[2 * v, T.ramp(0, 1, 2 * lanes)] + word_pairs(
                                    segs, x8, e, task // top_k * tvecs + b * vecs + v, g, ch, r, 3, 0)
                                if eight:
                                    acc16[2 * v + 1, T.ramp(0, 1, 2 * lanes)] = word_pairs(
                                        segs, x8, e, task // top_k * tvecs + b * vecs + v, g, ch, r, 0, 1)
                                    acc16[2 * v + 1, T.ramp(0, 1, 2 * lanes)] = acc16[2 * v + 1, T.ramp(0, 1, 2 * lanes)] + word_pairs(
                                        segs, x8, e, task // top_k * tvecs + b * vecs + v, g, ch, r, 1, 1)
                                    acc16[2 * v + 1, T.ramp(0, 1, 2 * lanes)] = acc16[2 * v + 1, T.ramp(0, 1, 2 * lanes)] + word_pairs(
                                        segs, x8, e, task // top_k * tvecs + b * vecs + v, g, ch, r, 2, 1)
                                    acc16[2 * v + 1, T.ramp(0, 1, 2 * lanes)] = acc16[2 * v + 1, T.ramp(0, 1, 2 * lanes)] + word_pairs(
                                        segs, x8, e, task // top_k * tvecs + b * vecs + v, g, ch, r, 3, 1)
                                    acc[2 * v, T.ramp(0, 1, lanes)] = acc[2 * v, T.ramp(0, 1, lanes)] + isa.quads(
                                        acc16[2 * v, T.ramp(0, 1, 2 * lanes)], 16) + isa.quads(
                                        acc16[2 * v + 1, T.ramp(0, 1, 2 * lanes)], 1)
                                else:
                                    acc[2 * v, T.ramp(0, 1, lanes)] = acc[2 * v, T.ramp(0, 1, lanes)] + isa.quads(
                                        acc16[2 * v, T.ramp(0, 1, 2 * lanes)], 1)
                    add_terms(scale, zero, sx, xsum, yacc, acc, e, task, r, g, b)

        return nest

    nests = [make_nest(d) for d in range(len(widths))]
    four = len(widths) == 4  # else three widths: the third test is left out (a Python-level False)
    if len(widths) not in (3, 4):
        raise MoecError(f"{fmt.name}: the int8 nested GEMV serves 3 or 4 widths, not {len(widths)}")
    w = list(widths)
    swiglu = spec.swiglu

    def output(yacc, yup, v, lane):
        """A task's output value of row ``v``, ``lane``: the rows, or with ``swiglu`` ``silu(gate) * up``."""
        return fast_silu(yacc[v, lane]) * yup[v, lane] if swiglu else yacc[v, lane]

    @T.macro
    def routed_rows(segs, scale, zero, prec, expert_ids, sx, xsum, x8, acc, yacc, task):
        """``yacc`` = task ``task``'s rows of the stack (``segs``, ``scale``, ``zero``) at its routed row's run-time width."""
        for v in T.unroll(tvecs):
            for lane in T.vectorized(lanes):
                yacc[v, lane] = T.float32(0)
        if prec[expert_ids[task % top_k]] == w[0]:
            nests[0](segs, scale, zero, sx, xsum, x8, yacc, acc, expert_ids[task % top_k], task,
                     task % top_k * xstride)
        elif prec[expert_ids[task % top_k]] == w[1]:
            nests[1](segs, scale, zero, sx, xsum, x8, yacc, acc, expert_ids[task % top_k], task,
                     task % top_k * xstride)
        elif four and prec[expert_ids[task % top_k]] == w[2]:
            nests[2](segs, scale, zero, sx, xsum, x8, yacc, acc, expert_ids[task % top_k], task,
                     task % top_k * xstride)
        else:  # the widest (the session refuses widths the format does not serve)
            nests[-1](segs, scale, zero, sx, xsum, x8, yacc, acc, expert_ids[task % top_k], task,
                      task % top_k * xstride)

    @T.macro
    def run_task(segs, scale, zero, ups, prec, expert_ids, y, sx, xsum, x8, acc, yacc, yup, task):
        """Parallel task ``task``: routed row ``task % top_k`` at its run-time width, row tile ``task // top_k``;
        with ``swiglu`` the same rows of the up stack ``ups`` (its segments, scale, zero) at the same width, and
        ``silu(gate) * up`` written."""
        if expert_ids[task % top_k] >= 0:
            routed_rows(segs, scale, zero, prec, expert_ids, sx, xsum, x8, acc, yacc, task)
            if swiglu:
                routed_rows(ups[0], ups[1], ups[2], prec, expert_ids, sx, xsum, x8, acc, yup, task)
            for v in T.unroll(tvecs):
                if task // top_k * tvecs + v < nb:
                    for lane in T.vectorized(lanes):
                        y[task % top_k, (task // top_k * tvecs + v) * lanes + lane] = output(yacc, yup, v, lane)

    @T.macro
    def body(x, segs, scale, zero, ups, prec, expert_ids, y):
        sx = T.alloc_buffer((xr, groups), "float32")
        xsum = T.alloc_buffer((xr, groups), "int32")
        xq = T.alloc_buffer((xr, k), "int8")
        x8 = T.alloc_buffer((xr, k), "int8")
        prep(x, sx, xsum, xq, x8)
        if task_lanes > 0:  # tasks taken dynamically (int8_common: claimed tasks)
            claims = T.alloc_buffer((claim_words,), "uint32")  # one bit per task, on the stack
            for c in range(claim_words):
                claims[c] = T.uint32(0)
            for cl in T.parallel(task_lanes):
                acc = T.alloc_buffer((2 * vecs, lanes), "int32", scope=stack_scope(2 * vecs * lanes * 4))
                yacc = T.alloc_buffer((tvecs, lanes), "float32", scope=stack_scope(tvecs * lanes * 4))
                yup = T.alloc_buffer((tvecs if swiglu else 1, lanes), "float32", scope=stack_scope(tvecs * lanes * 4))
                for j in range(ntask):
                    if unclaimed(claims, lane_task(cl, j, ntask, task_lanes, claim_tiles)):
                        if claim(claims, lane_task(cl, j, ntask, task_lanes, claim_tiles)):
                            run_task(segs, scale, zero, ups, prec, expert_ids, y, sx, xsum, x8, acc, yacc, yup,
                                     lane_task(cl, j, ntask, task_lanes, claim_tiles))
        else:
            for task in T.parallel(ntask):  # tile-major (int8_common: routed task order)
                # register tiles on the stack, the expert id, width and activation row read in place: a "local"
                # buffer or a bound scalar is a TVM workspace alloc/free per task (kernels/scopes.py)
                acc = T.alloc_buffer((2 * vecs, lanes), "int32", scope=stack_scope(2 * vecs * lanes * 4))
                yacc = T.alloc_buffer((tvecs, lanes), "float32", scope=stack_scope(tvecs * lanes * 4))
                yup = T.alloc_buffer((tvecs if swiglu else 1, lanes), "float32", scope=stack_scope(tvecs * lanes * 4))
                run_task(segs, scale, zero, ups, prec, expert_ids, y, sx, xsum, x8, acc, yacc, yup, task)

    def seg_shape(s):
        return (experts, nt, k * fmt.segment_bits[s] // 32, tile) if s < nseg else UNUSED

    scale_shape, zero_shape = (experts, nt, groups, tile), (experts, nt, zw, tile)
    if nseg not in (3, 4):
        raise MoecError(f"{fmt.name}: the int8 nested GEMV takes 3 or 4 segments, not {nseg}")

    # the widest signature (4 segments, the up stack), less what this variant does not take (kernels/signature.py)
    @T.prim_func
    def gemv(x: T.Buffer((xr, k), "float32"), seg0: T.Buffer(seg_shape(0), "uint32"),
             seg1: T.Buffer(seg_shape(1), "uint32"), seg2: T.Buffer(seg_shape(2), "uint32"),
             seg3: T.Buffer(seg_shape(3), "uint32"), scale: T.Buffer(scale_shape, "float16"),
             zero: T.Buffer(zero_shape, "uint32"), seg0_up: T.Buffer(seg_shape(0), "uint32"),
             seg1_up: T.Buffer(seg_shape(1), "uint32"), seg2_up: T.Buffer(seg_shape(2), "uint32"),
             seg3_up: T.Buffer(seg_shape(3), "uint32"), scale_up: T.Buffer(scale_shape, "float16"),
             zero_up: T.Buffer(zero_shape, "uint32"), prec: T.Buffer((experts,), "int32"),
             expert_ids: T.Buffer((top_k,), "int32"), y: T.Buffer((top_k, n), "float32")):
        T.func_attr({"global_symbol": "gemv", "tirx.noalias": True, "moec.row_guard": True})
        body(x, [seg0, seg1, seg2, seg3][:nseg], scale, zero,
             ([seg0_up, seg1_up, seg2_up, seg3_up][:nseg], scale_up, zero_up) if swiglu else None, prec, expert_ids, y)

    up = segment_names(nseg, suffix="_up") if swiglu else segment_names(0, suffix="_up") + ["scale_up", "zero_up"]
    return drop_params(gemv, segment_names(nseg) + up)
