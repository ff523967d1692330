"""Time of the int8-activation prefill grouped GEMM alone, per bit width, on random experts (one thread).

OLMoE-shaped defaults (N 1024, K 2048, group 64), ``--experts`` experts with ``--tokens`` tokens
each (512 prompt tokens x top-8 / 64 experts = 64). Prints GOPS (2*N*K per token and expert) and
the median of ``--reps`` calls (this thread's CPU time: TVM runs a one-thread pool inline)::

    TVM_NUM_THREADS=1 python benchmarks/gemm_times.py --bits 2,3,4,8
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "lower"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", default="2,3,4,8")
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--unpack-tokens", default=None,
                    help="override X86Params.gemm_unpack_tokens: BITS:TOKENS,... or 'none' (default: the schedule's)")
    ap.add_argument("--tile", default=None, help="override gemm_vectors x gemm_tokens, e.g. 4x4 (a comma-separated "
                                                 "list: each in turn)")
    args = ap.parse_args()
    import dataclasses

    from moec.lower.kernels.factory import host_target
    from moec.lower.schedules import x86

    target = host_target()
    for bits in [int(b) for b in args.bits.split(",")]:
        params = x86.gemv_params(target)  # the host's: 16-lane VNNI, or 8-lane AVX2 blocks
        if args.unpack_tokens is not None:
            pairs = [] if args.unpack_tokens == "none" else [tuple(map(int, p.split(":")))
                                                             for p in args.unpack_tokens.split(",")]
            params = dataclasses.replace(params, gemm_unpack_tokens=tuple(pairs))
        for tile in (args.tile.split(",") if args.tile else [None]):
            if tile:
                vecs, toks = map(int, tile.split("x"))
                params = dataclasses.replace(params, gemm_vectors=vecs, gemm_tokens=toks,
                                             gemm_tile_block=(vecs, toks))
            _time(args, bits, tile, params, target)


def _time(args, bits: int, tile: str | None, params, target) -> None:
    """Build the GEMM with ``params`` and print the median of ``--reps`` calls."""
    import tvm

    from kernel_helpers import expert_stack, weight_args
    from moec.lower.kernels.factory import compile_kernel
    from moec.lower.kernels.grouped_gemm import GroupedGemmSpec
    from moec.lower.schedules import x86
    n, k, gs, ne, t = args.n, args.k, args.group, args.experts, args.tokens
    spec = GroupedGemmSpec(bits, n, k, gs, ne, params.tile_for(n, bits, "int8"))
    mod = compile_kernel(x86.int8_grouped_gemm(spec, target, params), target)
    stack, _ = expert_stack(bits, n, k, gs, ne, activations="int8")
    offsets = np.arange(ne + 1, dtype=np.int32) * t
    x = np.random.default_rng(1).standard_normal((ne * t // 8 + 1, k)).astype(np.float32)
    rows = np.random.default_rng(2).integers(0, len(x), ne * t).astype(np.int32)
    a = [tvm.runtime.tensor(v, tvm.cpu()) for v in
         [x, rows] + weight_args(stack) + [offsets, np.zeros((ne * t, n), np.float32)]]
    f = mod["grouped_gemm"]
    for _ in range(3):
        f(*a)
    ts = []
    for _ in range(args.reps):
        t0 = time.thread_time()
        f(*a)
        ts.append(time.thread_time() - t0)
    med = float(np.median(ts))
    label = f"{bits} bits" + (f" {tile}" if tile else "")
    print(f"{label}: {med * 1e3:8.3f} ms  {2 * n * k * ne * t / med / 1e9:7.1f} GOPS  "
          f"(load {os.getloadavg()[0]:.2f})", flush=True)


if __name__ == "__main__":
    main()
