"""Claim order of the x86 int8 decode GEMVs: tile-major against expert-major, fixed and nested, per expert shape.

The VNNI/AVX2 int8 GEMVs claim their parallel tasks (``X86Params.int8_claim_lanes``); this compares the
order a lane claims them in (``X86Params.int8_expert_major_claims``, ``int8_common.lane_task``) on the
OLMoE routed shapes, fixed and nested, each under the current ``X86Params`` otherwise (session 22 also
compared the nested GEMV's 64-row one- and two-tile blocks here, README "Session 22"; since session 23 a
nested task is one 128-row block, ``int8_nested_block_vectors``):

- ``gate``: 64 experts × [1024, 2048], one input row (the plain GEMV of the gate or up shape);
- ``down``: 64 experts × [2048, 1024], an input row per routed expert (the down projection);
- ``swiglu``: the SwiGLU call, gate and up stacks of 64 experts × [1024, 2048] (the fixed kernel's fused
  stack of 2048 rows, the nested kernel's two stacks).

Random codes in the kernel layouts (stacks far larger than the L2/L3), 8 routed experts a call drawn in
turn from 16 random sets; every variant reads its own copy of the stack with its own routing (a variant
right after another on the same stack would find that call's experts in cache), all variants interleaved
call by call, wall time, medians. Nested at a run-time width ``w`` of 8-bit storage against the fixed
kernel of width ``w``.

Usage::

    python benchmarks/claim_order.py [--shapes gate,down,swiglu] [--widths 2,4,8] [--threads 1,2] [--calls 100]
    python benchmarks/claim_order.py --mcpu haswell    # the AVX2 kernels (8-row vectors) on this host

AVX2 has no 3-bit fixed int8 GEMV (that width is left out with a note).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import tvm
from tvm.target import codegen

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dynamic import _random_packed  # noqa: E402
from moec.core.errors import MoecError
from moec.lower.kernels.factory import compile_kernel, host_target, kernel_tile, make_gemv, make_nested_gemv
from moec.lower.kernels.layout import nested_kernel_layout, stack_kernel_layouts, to_kernel_layout
from moec.lower.schedules import x86
from moec.quant.nested import nest
from moec.runtime.session import use_threads

GROUP, EXPERTS, TOP_K = 64, 64, 8
SHAPES = {"gate": (1024, 2048, False, False), "down": (2048, 1024, True, False), "swiglu": (1024, 2048, False, True)}
FIXED = {"fixed tile-major": dict(int8_expert_major_claims=False),
         "fixed expert-major": dict(int8_expert_major_claims=True)}
NESTED = {"nested tile-major": dict(int8_expert_major_claims=False),
          "nested expert-major": dict(int8_expert_major_claims=True)}


def with_params(changes: dict, build):
    """``build()`` with ``x86.PARAMS`` changed by ``changes`` (the kernel factories read it)."""
    saved = x86.PARAMS
    x86.PARAMS = dataclasses.replace(saved, **changes)
    try:
        return build()
    finally:
        x86.PARAMS = saved


def time_shape(shape: str, widths: list[int], threads: list[int], calls: int, rng, target) -> None:
    """Print a table row per width and thread count of ``shape``."""
    n, k, per_expert, swiglu = SHAPES[shape]
    dev = tvm.cpu()
    tile = kernel_tile(target, n, None, "int8")
    stacks = [stack_kernel_layouts([nested_kernel_layout(nest(_random_packed(8, n, k, GROUP, rng)), tile)
                                    for _ in range(EXPERTS)]) for _ in range(2 if swiglu else 1)]

    def nested_args():  # a fresh device copy per variant
        return [tvm.runtime.tensor(st[name], dev) for st in stacks
                for name in [f"seg{s}" for s in range(4)] + ["scale", "zero"]]

    nested = {label: (with_params(p, lambda: compile_kernel(make_nested_gemv(
        8, n, k, GROUP, EXPERTS, TOP_K, target, x_per_expert=per_expert, activations="int8", swiglu=swiglu),
        target)), nested_args()) for label, p in NESTED.items()}
    x = tvm.runtime.tensor(rng.standard_normal((TOP_K if per_expert else 1, k)).astype(np.float32), dev)
    y = tvm.runtime.tensor(np.zeros((TOP_K, n), np.float32), dev)
    ids = [tvm.runtime.tensor(rng.choice(EXPERTS, TOP_K, replace=False).astype(np.int32), dev) for _ in range(16)]
    for bits in widths:
        rows_n = 2 * n if swiglu else n  # the fixed SwiGLU GEMV's stack holds gate and up rows
        fixed_stack = stack_kernel_layouts([to_kernel_layout(_random_packed(bits, rows_n, k, GROUP, rng),
                                                             kernel_tile(target, rows_n, bits, "int8"))
                                            for _ in range(EXPERTS)])
        try:
            fixed = {label: (with_params(p, lambda: compile_kernel(make_gemv(
                bits, n, k, GROUP, EXPERTS, TOP_K, target, x_per_expert=per_expert, activations="int8",
                swiglu=swiglu), target)), [tvm.runtime.tensor(fixed_stack[a], dev) for a in ("weight", "scale", "zero")])
                for label, p in FIXED.items()}
        except MoecError as e:  # (AVX2: no 3-bit int8 GEMV)
            print(f"| {shape} | | {bits} | no fixed int8 kernel here: {e} |", flush=True)
            continue
        prec = tvm.runtime.tensor(np.full(EXPERTS, bits, np.int32), dev)
        variants = {**fixed, **{label: (mod, args + [prec]) for label, (mod, args) in nested.items()}}
        for th in threads:
            use_threads(th)
            times = {label: [] for label in variants}
            for c in range(calls):
                for v, (label, (mod, args)) in enumerate(variants.items()):
                    routed = ids[(c + 3 * v) % len(ids)]
                    t0 = time.perf_counter()
                    mod["gemv"](x, *args, routed, y)
                    times[label].append(time.perf_counter() - t0)
            us = {label: statistics.median(t[3:]) * 1e6 for label, t in times.items()}
            f_tm, f_em = us["fixed tile-major"], us["fixed expert-major"]
            old, new = us["nested tile-major"], us["nested expert-major"]
            print(f"| {shape} | {th} | {bits} | " + " | ".join(f"{us[label]:.0f}" for label in variants)
                  + f" | {f_em / f_tm:.2f} | {new / old:.2f} | {old / f_tm:.2f}x | {new / f_em:.2f}x |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="gate,down,swiglu")
    ap.add_argument("--widths", default="2,4,8")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--mcpu", default=None, help="Build for this LLVM CPU instead of the host's (haswell: AVX2).")
    args = ap.parse_args()
    target = host_target() if args.mcpu is None else tvm.target.Target({"kind": "llvm", "mcpu": args.mcpu})
    if not codegen.target_has_features("avx2", target):
        ap.error(f"--mcpu {args.mcpu}: not an x86 CPU with AVX2 that LLVM knows (the int8 GEMVs need one)")
    shapes = args.shapes.split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        ap.error(f"unknown shape {unknown[0]!r} (known: {', '.join(SHAPES)})")
    try:
        widths, threads = [int(w) for w in args.widths.split(",")], [int(t) for t in args.threads.split(",")]
    except ValueError:
        ap.error("--widths and --threads take comma-separated integers")
    if not set(widths) <= {2, 3, 4, 8} or min(threads) < 1:
        ap.error("--widths are nested 8-bit storage's widths (2, 3, 4, 8); --threads at least 1")
    print(f"\n## x86 int8 decode GEMVs ({target.attrs.get('mcpu', 'host')}): claim order and nested blocks (64 "
          f"experts, top-8, group {GROUP}, "
          f"wall µs a call, median of {args.calls}; load average {os.getloadavg()[0]:.1f} at the start)\n")
    print("| shape | threads | width | " + " | ".join([*FIXED, *NESTED]) + " | fixed expert-/tile-major | "
          "nested new/old | nested/fixed, old | nested/fixed, new |")
    print("|---" * (3 + len(FIXED) + len(NESTED) + 4) + "|")
    rng = np.random.default_rng(0)
    for shape in shapes:
        time_shape(shape, widths, threads, args.calls, rng, target)
    print(f"\n(old: tile-major claims; new: expert-major claims. Load average {os.getloadavg()[0]:.1f} at the end)")


if __name__ == "__main__":
    main()
