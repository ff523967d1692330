"""x86 (AVX-512 / AVX2) schedules of the MoE kernels; every x86 tuning parameter lives here."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import tvm
from tvm import tirx
from tvm.target import codegen

from moec.core.errors import MoecError
from moec.lower.kernels.gemv import GemvSpec
from moec.lower.kernels.grouped_gemm import GemmLoopParams
from moec.lower.schedules import cpu_gemv
from moec.lower.schedules.cpu_gemv import CpuScheduleParams
from moec.lower.schedules.x86_avx2 import (AVX2_BITS, avx2_gemv, avx2_grouped_gemm, avx2_nested_gemv,
                                           avx2_nested_grouped_gemm)
from moec.lower.schedules.x86_vnni import vnni_gemv
from moec.lower.schedules.x86_vnni_gemm import vnni_grouped_gemm
from moec.lower.schedules.x86_vnni_nested import vnni_nested_gemv, vnni_nested_grouped_gemm


@dataclass(frozen=True)
class X86Params(CpuScheduleParams):
    """Tuning parameters of the x86 schedules.

    Attributes
    ----------
    lanes : int
        Rows per vector: 16 float32 lanes of an AVX-512 register (two AVX2 registers).
    tile_vectors : int
        Vectors of rows per parallel task: a thread owns ``lanes * tile_vectors`` output rows
        (64), so ``tile_vectors`` accumulators stay in registers and share each broadcast of x.
    layout_tile : int
        Rows per tile of the kernel layout (``kernel_tile``) of 8-bit, float and nested weights. 16 =
        one vector: a task then reads ``tile_vectors`` concurrent streams, which measured about 1.4x
        the cold bandwidth of one 64-row stream at 2 bits on the 2-core x86 VM (more misses in
        flight), and at 8 bits still 12 % more than 128-row tiles (27.7 vs 24.5 GB/s).
    code_tile, code_tile_bits : int, tuple of int
        Largest row tile of 2- and 4-bit weights read by int8-activation kernels (per weight, the
        largest power-of-two divisor of its rows up to this, so no tile is padded; float32-activation
        kernels keep ``layout_tile``: their 4-vector task read half of each 128-row tile's rows, and
        the 4-bit float GEMV took 4,659 µs a call against 3,468 on 16-row tiles, 2 bits 3,343 against
        3,230, on an AVX2 host, 2026-12-03): 128 = the int8 GEMV's task
        (``int8_tile_vectors`` vectors), which then reads one contiguous block of its expert's codes
        (64 KB at 2 bits for K = 2048) instead of 8 interleaved streams of 8-16 KB that end before
        the hardware prefetcher is up to speed. On the 2-core x86 VM (2 threads, DRAM, 4 of 8
        rows routed over 256 experts): 2 bits 19.8-20.4 → 23.8-25.3 GB/s, 4 bits 22.4-24.5 → 27.2-27.5;
        3 bits 20.0 → 12.9 (its steps read three words of a tile at once: kept at 16); whole
        OLMoE-shaped decode steps 1.21-1.22x (mixed 2/4) and 1.17-1.26x (uniform:4) faster
        (2026-12-03, README).
    unroll_values : int
        Codes decoded per fully unrolled step (32: a whole number of words at every bit width,
        so all shifts and word offsets are constants); a smaller group size uses gcd(32, gs).
    float_unroll : int
        K steps unrolled in the float GEMV.
    gemm_tokens : int
        Tokens per register block in the grouped GEMMs (float32 and int8 activations).
    gemm_vectors : int
        16-row vectors per parallel task of the int8 (VNNI) grouped GEMM: ``gemm_vectors *
        gemm_tokens`` int32 accumulators stay in registers and share each extracted code vector.
    gemm_tile_block : tuple of (vectors, tokens)
        ``gemm_vectors`` x ``gemm_tokens`` of the int8 grouped GEMM on 128-row tiles (``code_tile``):
        8 x 2 makes a task one whole tile (4 x 4 read half of each tile's rows, strided:
        OLMoE-shaped 64-token prefill 16 % slower; 8 x 2 as fast as 4 x 4 on 16-row tiles, where
        8 x 2 was 11 % slower at 512 tokens and 8 bits).
    gemm_split : int
        Parts of the int8 grouped GEMM's tasks, each with 1/``gemm_split`` of every expert's tiles
        (expert-major inside a part). TVM runs a contiguous range of tasks per thread: expert-major
        over all tasks gave one of 2 threads the busy experts (parallel efficiency 0.71-0.84 on
        the OLMoE routing, ``benchmarks/gemm_balance.py``); 4 parts balance 1, 2 or 4 threads and
        keep an expert's token rows in cache across a part's consecutive tiles.
    gemm_unpack_tokens : tuple of (bits, tokens)
        Per bit width, the fewest tokens of an expert for which the int8 grouped GEMM unpacks the
        task's codes into a byte workspace once (``gemm_vectors * 16 * K`` bytes) instead of
        extracting them per token block (absent: never). 3 bits: extraction with
        ``vpmultishiftqb`` costs about a block's dot products; unpacked, 64 tokens per expert
        ran ~1.6x faster on the OLMoE shapes (``benchmarks/gemm_times.py``), 8 tokens no faster.
    int8_tile_vectors : int
        ``tile_vectors`` of the int8 (VNNI) GEMV: 8 concurrent row streams per thread measured
        ~10% more cold bandwidth at 2-3 bits than 4 (its compute leaves more room).
    int8_nested_tile_vectors : int
        16-row vectors per two-chain register block of the int8 nested GEMV (``x86_vnni_nested``; a task's
        ``int8_nested_task_vectors`` vectors run at 8 bits as such blocks one after another): its rebuild
        keeps each chunk's segment words and the 8 broadcast activations live, so 8 vectors (16
        accumulators) spilled 74-78 vectors a chunk at 3 and 8 bits; 4 spill 4-14 (2026-12-03,
        kernel alone, CPU time at load 6: 8-bit 2,013 → 1,145 µs a call cold).
    int8_nested_task_vectors : int
        16-row vectors per parallel task of the int8 nested GEMV (0: ``int8_nested_tile_vectors``): 8 = two
        64-row tiles, which widths up to 4 bits run as one block of one chain a vector (odd nibble lanes
        shifted down, one more shift a word, so 8 accumulators as before) and 8 bits as two 4-vector
        blocks one after another (since 2026-12-05 one 8-vector one-chain block at every width on a 128-row tile:
        ``int8_nested_block_vectors``). Kernel alone (``benchmarks/dynamic.py --parts kernel --calls 300 --modes
        int8``, 2026-12-04, Zen 5, two interleaved runs each), nested / fixed time at 2/3/4/8 bits, 4 → 8:
        1 thread 1.28–1.33 / 1.03–1.08 / 1.42–1.47 / 1.16–1.17x → 1.19–1.23 / 0.94–0.97 / 1.29–1.30 /
        1.06–1.08x; 2 threads 1.21–1.23 / 1.01 / 1.16–1.19 / 1.11–1.13x → 1.12–1.17 / 0.96–1.08 / 1.17–1.18 /
        1.11–1.12x. Eight vectors of two chains (16 accumulators) spilled; so did one chain at 8 bits (24
        spill stores a 64-dot block: 1.25–1.26x at one thread), and the two 8-bit blocks run group by group
        instead of one after another were 1.45–1.47x.
    int8_nested_block_vectors : int
        Vectors of each one-chain register block of an ``int8_nested_task_vectors`` task, the blocks one after
        another, each over the whole K (0: twice ``int8_nested_tile_vectors``). 8, the default since 2026-12-05:
        the whole task, one 128-row layout tile (``nested_int8_tile``), so each segment is one contiguous stream
        read 512 bytes a word row, as the fixed 2/4-bit kernels read theirs. It was 4 (one 64-row tile a block,
        README "Session 22"): with 64-row tiles two-tile blocks had read two streams a segment and lost.
    int8_nested_eight_one_chain : bool
        8 bits also runs one-chain blocks of ``int8_nested_block_vectors`` (both byte words of a nibble word hold
        whole codes, so they share an accumulator) instead of two-chain blocks of ``int8_nested_tile_vectors``.
        With the vector-by-vector chunk order one chain at 8 bits spilled (1.25–1.26x at one thread, 2026-12-04);
        with ``int8_nested_word_order`` it does not lose.
    int8_nested_word_order : tuple of int
        Widths whose one-chain blocks step a chunk nibble word by nibble word across the block's vectors (each
        segment word row read across all the vectors before the next), the others vector by vector (each
        vector's four words together). At 4 bits the rebuild's 1-bit pair words, shared by a vector's four
        words, would be live for all 8 vectors: vector by vector was faster there. Measured with the defaults
        above against 64-row tiles, 4-vector blocks, two-chain 8-bit blocks and no word order (README "Session
        23"; Zen 5, kernel alone, gate shape, nested / fixed time at 2/3/4/8 bits, two runs): one thread
        1.11–1.14 / 0.65–0.67 / 1.20–1.21 / 0.98–1.02x against 1.56–1.99 / 0.70–0.76 / 1.19–1.45 / 0.96–0.99x, two
        threads 1.03–1.07 / 0.79–0.82 / 1.02–1.03 / 0.98–1.00x against 1.29–1.37 / 0.82–0.83 / 1.03–1.07 /
        0.99x; whole OLMoE-shaped nested bundles 1.02–1.14x faster (2 threads) and 1.01–1.15x (one thread).
    nested_int8_tile : int
        Largest row tile of nested stacks read by the int8 nested GEMV and grouped GEMM (0: ``layout_tile``).
        128 since 2026-12-05 (the task's rows, as the fixed 2/4-bit ``code_tile``); 64 before, when the 8-bit
        nest's two-chain 4-vector blocks read half of every 512-byte row of a 128-row tile (1.5–2.0x slower at 8
        bits, and 1.7–2.1x at 2 bits with tile-major claims, 2026-12-04). 64 against 16-row tiles, 2 threads,
        2026-12-04: nested µs a call at 2/3/4/8 bits 129/192/231/411 against 152/196/253/469. The nested prefill
        GEMM's task is then 8 vectors × 2 tokens (``nested_gemm_block``): 16-token prompts 6–21 % faster, 256-token
        ones 0–13 % slower (``benchmarks/nested_gemm.py``, README "Session 23").
    int8_chains : int
        Independent int32 accumulators per vector in the VNNI GEMV, so consecutive ``vpdpbusd``
        do not wait on each other's latency.
    int8_plane_masks : bool
        At 2 and 4 bits, the VNNI GEMV masks odd code planes in place (``code << bits`` per byte)
        instead of shifting them down, summing them in the second accumulator chain and shifting
        that sum once per group: a 2-bit step issues one shift instead of three, a 4-bit step none.
    int8_claim_lanes : int
        The VNNI GEMVs' tasks (fixed and nested) are taken, not handed out: a parallel loop of this many lanes (TVM
        splits it over the pool's threads) where each lane scans every task from its own start and
        runs those it claims with an atomic bit test-and-set (``lock bts``), so a thread that
        finishes early takes the rest of the other's tasks. 0, and calls with fewer tasks than
        lanes: TVM's static split (each thread a contiguous share of the tasks), whose two threads
        finished a call 1-43 % of it apart (measured with cycle stamps per task).
    int8_expert_major_claims : bool
        Claimed tasks (``int8_claim_lanes``; fixed and nested GEMVs, VNNI and AVX2) are taken in expert-major
        order (``int8_common.lane_task``): a lane's consecutive tasks are consecutive row tiles of one routed
        expert, so the code stream of each tile (fixed 2/4-bit: one 128-row block; nested: one per segment)
        continues where the previous task's ended instead of starting cold in another expert. False:
        tile-major (task ``t`` = routed row ``t % top_k``, tile ``t // top_k``, as the static split). Kernel
        alone, OLMoE shapes, Zen 5 (``benchmarks/claim_order.py``, 2026-12-04): fixed VNNI time 0.66–0.93 of
        tile-major at 2 and 4 bits one thread, 0.86–0.95 two (3 and 8 bits: 16-row tiles, unchanged); the AVX2
        kernels on the same host 0.36–0.98; whole OLMoE-shaped nested bundles' speed from 0.87–0.90 to
        0.93–0.96 of the fixed bundles' at uniform 8 bits (README "Session 22").
    prefetch_words : int
        Software prefetch distance of the VNNI GEMV in words of each row stream (0: none, the
        default). A prefetch in the step loop may alias the accumulator buffer as far as LLVM
        knows, so it kept every accumulator in memory (one 64-byte store per ``vpdpbusd``);
        without it the accumulators stay in registers: on the 2-core x86 VM (quiet, 2 threads,
        group 64) the 4-bit GEMV went from 27 to 84 GB/s out of cache and from 23.5 to 27.7 GB/s
        cold (2 / 3 / 8 bits: 22.5 / 22.4 / 29.1 to 28.1 / 29.4 / 36.5 GB/s cold;
        ``benchmarks/kernel_bandwidth.py``). Earlier, with the stores, 8 had measured 5-10 %
        more cold bandwidth than none.
    prefetch_locality : int
        ``llvm.prefetch`` locality (3 = prefetcht0, 0 = prefetchnta).
    avx2_lanes : int
        ``lanes`` of the float32-activation GEMVs (fixed and nested) on targets without AVX-512
        (:func:`gemv_params`): 8, one AVX2 register, so a task's accumulators, codes and
        activations fit AVX2's 16 registers (16 lanes are two registers each). On an AVX2 host (Zen 1,
        2026-12-03), 2 threads: fixed GEMV 1 / 4 / 14 / 12 % faster at 2 / 3 / 4 / 8 bits, nested
        (8-bit storage) 2 / 4 / 16 / 14 % (README, session 13). N stays a multiple of 16 rows
        (``row_multiple``), as the grouped GEMM and the int8 kernels need.
    avx2_gemm_vectors, avx2_gemm_tokens : int
        ``gemm_vectors`` and ``gemm_tokens`` of the AVX2 int8 grouped GEMM (8-row vectors; ``vectors x tokens``
        int32 accumulators of AVX2's 16 registers).
    avx2_int8_tile_vectors, avx2_int8_chains, avx2_nested_tile_vectors : int
        ``int8_tile_vectors``, ``int8_chains`` and ``int8_nested_tile_vectors`` of the AVX2 int8-activation
        GEMVs (``x86_avx2``, 8-lane vectors, 16 registers). A task's rows are also the layout tile there
        (fixed 2- and 4-bit weights: ``code_tile`` = 8 x ``avx2_int8_tile_vectors``; nested stacks:
        ``nested_int8_tile`` = 8 x ``avx2_nested_tile_vectors``), so a task reads one contiguous block.
        On an AVX2 host (Zen 1, 2 threads, 2026-12-03, ``benchmarks/kernel_variants.py --activations
        int8``): fixed GEMV within 3 % for 4 or 8 vectors and 1 or 2 chains; nested 4 vectors on 32-row
        tiles against 2 vectors on 16-row tiles 5 / 12 / 7 / 0 % faster at 2 / 3 / 4 / 8 bits (1 vector:
        up to 30 % slower).

    """

    family: ClassVar[str] = "x86"

    lanes: int = 16
    tile_vectors: int = 4
    layout_tile: int = 16
    code_tile: int = 128
    code_tile_bits: tuple[int, ...] = (2, 4)
    unroll_values: int = 32
    float_unroll: int = 8
    gemm_tokens: int = 4
    gemm_vectors: int = 4
    gemm_tile_block: tuple[int, int] = (8, 2)
    gemm_split: int = 4
    gemm_unpack_tokens: tuple[tuple[int, int], ...] = ((3, 12),)
    int8_tile_vectors: int = 8
    int8_nested_tile_vectors: int = 4
    int8_nested_task_vectors: int = 8
    int8_nested_block_vectors: int = 8
    int8_nested_eight_one_chain: bool = True
    int8_nested_word_order: tuple[int, ...] = (2, 3, 8)
    nested_int8_tile: int = 128
    int8_chains: int = 2
    int8_plane_masks: bool = True
    int8_claim_lanes: int = 16
    int8_expert_major_claims: bool = True
    prefetch_words: int = 0
    prefetch_locality: int = 3
    avx2_lanes: int = 8
    avx2_int8_tile_vectors: int = 4
    avx2_int8_chains: int = 2
    avx2_nested_tile_vectors: int = 4
    avx2_gemm_vectors: int = 2
    avx2_gemm_tokens: int = 4
    row_multiple: int = 16

    def gemm_block(self, tile: int) -> tuple[int, int]:
        """(vectors, tokens) of the int8 grouped GEMM's task for a layout of ``tile``-row tiles: a whole
        tile when it is ``gemm_tile_block``'s size (``code_tile``), else (``gemm_vectors``, ``gemm_tokens``)."""
        return self.gemm_tile_block if tile == 16 * self.gemm_tile_block[0] else (self.gemm_vectors, self.gemm_tokens)

    def nested_gemm_block(self, tile: int) -> tuple[int, int]:
        """(vectors, tokens) of the int8 nested grouped GEMM's task on ``tile``-row nested layout tiles: the whole
        tile (``tile // lanes`` vectors) and as many tokens as keep :meth:`gemm_block`'s accumulator count, when
        the tile holds at least ``gemm_vectors`` vectors; else :meth:`gemm_block`. AVX-512 128-row tiles (since
        2026-12-05): 8 x 2, the fixed GEMM's block (64-row tiles were 4 x 4); AVX2 32-row tiles: 4 x 2 instead of 2 x 4 (each task read half of every tile row),
        measured 1.1–1.25x faster at 2 and 4 bits, 8 bits within noise (AVX2 code on a Zen 5 host,
        ``benchmarks/nested_gemm.py --target x86-64-v3``; no AVX2-only host this session)."""
        vectors, tokens = self.gemm_block(tile)
        per_tile = tile // self.lanes
        if tile % self.lanes or per_tile < vectors:
            return vectors, tokens
        return per_tile, max(1, vectors * tokens // per_tile)


PARAMS = X86Params()


def gemv_params(target: tvm.target.Target) -> X86Params:
    """The parameters of the x86 schedules for ``target``: :data:`PARAMS`, or where the target lacks AVX-512
    ``avx2_lanes`` lanes and the ``avx2_*`` register blocks of the int8 GEMVs (whose task is then the
    2- and 4-bit layout tile)."""
    if codegen.target_has_features("avx512f", target):
        return PARAMS
    p = PARAMS
    return dataclasses.replace(p, lanes=p.avx2_lanes, int8_tile_vectors=p.avx2_int8_tile_vectors,
                               int8_chains=p.avx2_int8_chains, int8_nested_tile_vectors=p.avx2_nested_tile_vectors,
                               gemm_vectors=p.avx2_gemm_vectors, gemm_tokens=p.avx2_gemm_tokens,
                               code_tile=p.avx2_lanes * p.avx2_int8_tile_vectors,
                               nested_int8_tile=p.avx2_lanes * p.avx2_nested_tile_vectors)


def schedule_gemv(func: tirx.PrimFunc, spec: GemvSpec, params: X86Params | None = None) -> tirx.PrimFunc:
    """Schedule a ``gemv_definition`` for x86 (:func:`moec.lower.schedules.cpu_gemv.schedule_gemv`).

    A thread owns ``lanes * tile_vectors`` rows (16-lane vectors); ``params`` defaults to
    :data:`PARAMS`.
    """
    return cpu_gemv.schedule_gemv(func, spec, params or PARAMS)


def grouped_gemm_params(params: X86Params | None = None) -> GemmLoopParams:
    """Loop parameters of the grouped GEMM on x86 (vector, token block, unroll step)."""
    return cpu_gemv.grouped_gemm_params(params or PARAMS)


def int8_gemv(spec: GemvSpec, target: tvm.target.Target,
              params: X86Params | None = None) -> tirx.PrimFunc:
    """The int8-activation GEMV: AVX-512 VNNI (``x86_vnni``), else AVX2 at 2, 4 and 8 bits (``x86_avx2``);
    a clear error elsewhere. ``params`` default: :func:`gemv_params` of ``target``."""
    params = params or gemv_params(target)
    cpu_gemv.check_spec(spec, params, "int8")
    if not _has_vnni(spec.bits, target):
        _require_avx2(spec.bits, target)
        return avx2_gemv(spec, params)
    return vnni_gemv(spec, params)


def _vnni_features(bits: int) -> list[str]:
    return ["avx512vnni"] + (["avx512vbmi"] if bits == 3 else [])  # vpmultishiftqb


def _has_vnni(bits: int, target: tvm.target.Target) -> bool:
    return all(codegen.target_has_features(f, target) for f in _vnni_features(bits))


def _has_gfni(target: tvm.target.Target) -> bool:
    """GFNI (``vgf2p8affineqb``): the nested int8 kernels move high nibbles down in one instruction at 3 and 4 bits
    (``int8_common.gfni_nibble_down``; cache-resident GEMV calls 7–20 % faster there, README "Session 23")."""
    return codegen.target_has_features("gfni", target)


def _require_avx2(bits: int, target: tvm.target.Target, widths: tuple[int, ...] = AVX2_BITS) -> None:
    """Without VNNI: the AVX2 kernels, at ``widths``; else one line naming what is missing."""
    if not codegen.target_has_features("avx2", target):
        raise MoecError(f"int8 activations need AVX2 (or AVX-512 VNNI); target {target} has neither "
                        f"(use activations='float32')")
    if bits not in widths:
        raise MoecError(f"{bits}-bit int8 activations need {', '.join(_vnni_features(bits))}, which target "
                        f"{target} lacks (its AVX2 kernels take {', '.join(map(str, widths))} bits; "
                        f"use activations='float32')")
    if codegen.target_has_features("avx512f", target):  # 16-lane parameters: the AVX2 kernels take 8
        raise MoecError(f"int8 activations on an AVX-512 target need avx512vnni, which target {target} lacks "
                        f"(the AVX2 int8 kernels serve targets without AVX-512; use activations='float32')")


def int8_grouped_gemm(spec, target: tvm.target.Target, params: X86Params | None = None) -> tirx.PrimFunc:
    """The int8-activation prefill grouped GEMM (``x86_vnni_gemm``): AVX-512 VNNI, else AVX2 at 2, 4 and 8 bits."""
    if not _has_vnni(spec.bits, target):
        _require_avx2(spec.bits, target)
        return avx2_grouped_gemm(spec, params or gemv_params(target))
    return vnni_grouped_gemm(spec, params or PARAMS)


def schedule_nested_gemv(func: tirx.PrimFunc, spec, params=None) -> tirx.PrimFunc:
    """Schedule a nested (run-time width) GEMV with this family's parameters (``cpu_gemv``)."""
    return cpu_gemv.schedule_nested_gemv(func, spec, params or PARAMS)


def int8_nested_gemv(spec, target: tvm.target.Target, params: X86Params | None = None) -> tirx.PrimFunc:
    """The int8-activation nested GEMV: AVX-512 VNNI (``x86_vnni_nested``), else AVX2 (``x86_avx2``, every
    width the nested formats serve)."""
    params = params or gemv_params(target)
    if not _has_vnni(spec.storage_bits, target):
        _require_avx2(spec.storage_bits, target, widths=(spec.storage_bits,))
        return avx2_nested_gemv(spec, params, _has_gfni(target))
    return vnni_nested_gemv(spec, params, gfni=_has_gfni(target))


def int8_nested_grouped_gemm(spec, target: tvm.target.Target, params: X86Params | None = None) -> tirx.PrimFunc:
    """The int8-activation nested prefill grouped GEMM (``int8_nested_gemm``): AVX-512 VNNI (``x86_vnni_nested``),
    else AVX2 (``x86_avx2``)."""
    params = params or gemv_params(target)
    if not _has_vnni(spec.storage_bits, target):
        _require_avx2(spec.storage_bits, target, widths=(spec.storage_bits,))
        return avx2_nested_grouped_gemm(spec, params, _has_gfni(target))
    return vnni_nested_grouped_gemm(spec, params, gfni=_has_gfni(target))
