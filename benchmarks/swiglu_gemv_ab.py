"""The int8 SwiGLU GEMV against what it replaces, on the OLMoE routed shape: one call vs two int8 GEMVs + ``row_silu``.

Random codes and scales in the kernel layout (64 experts, n 1024, k 2048, group 64), 8 routed ids per
call drawn from 64 sets in turn (the stacks, 2 × 64 experts, are larger than the L2/L3 share, so the
weights come mostly from DRAM); the calling thread's CPU time per call set, ``--rounds`` rounds with
both forms interleaved, medians. Run with ``TVM_NUM_THREADS=1`` for the kernels' own cost (with a
pool the calling thread's CPU time leaves out the workers').

Usage::

    TVM_NUM_THREADS=1 python benchmarks/swiglu_gemv_ab.py [--bits 4] [--rounds 7]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import tvm

from moec.lower.kernels.factory import compile_kernel, host_target, make_gemv
from moec.lower.kernels.rowwise import silu_kernel

N, K, GROUP, EXPERTS, TOP_K, TILE = 1024, 2048, 64, 64, 8, 16


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    bits, target, dev = args.bits, host_target(), tvm.cpu()
    fused = compile_kernel(make_gemv(bits, N, K, GROUP, EXPERTS, TOP_K, target, activations="int8", swiglu=True,
                                     separate_up=True), target)
    plain = compile_kernel(make_gemv(bits, N, K, GROUP, EXPERTS, TOP_K, target, activations="int8"), target)
    silu = compile_kernel(silu_kernel(N), target)
    rng = np.random.default_rng(0)

    def stack():
        nt, zw = N // TILE, (K // GROUP * bits + 31) // 32
        return [tvm.runtime.tensor(rng.integers(0, 2**32, (EXPERTS, nt, K * bits // 32, TILE), dtype=np.uint32), dev),
                tvm.runtime.tensor((rng.random((EXPERTS, nt, K // GROUP, TILE)) * 0.01).astype(np.float16), dev),
                tvm.runtime.tensor(rng.integers(0, 2**32, (EXPERTS, nt, zw, TILE), dtype=np.uint32), dev)]

    w1, w3 = stack(), stack()
    x = tvm.runtime.tensor(rng.standard_normal((1, K)).astype(np.float32), dev)
    out = [tvm.runtime.tensor(np.zeros((TOP_K, N), np.float32), dev) for _ in range(4)]
    ids = [tvm.runtime.tensor(rng.choice(EXPERTS, TOP_K, replace=False).astype(np.int32), dev) for _ in range(64)]
    forms = {"fused (1 call)": lambda i: fused["gemv"](x, *w1, *w3, i, out[0]),
             "2 GEMVs + row_silu": lambda i: (plain["gemv"](x, *w1, i, out[1]), plain["gemv"](x, *w3, i, out[2]),
                                              silu["row_silu"](out[1], out[3]))}
    times = {name: [] for name in forms}
    for _ in range(args.rounds + 1):  # the first round warms up (discarded)
        for name, run in forms.items():
            t0 = time.thread_time()
            for i in ids:
                run(i)
            times[name].append((time.thread_time() - t0) / len(ids) * 1e6)
    for name, v in times.items():
        print(f"{bits}-bit {name}: median {np.median(v[1:]):.0f} us CPU per call set "
              f"(rounds {' '.join(f'{a:.0f}' for a in v[1:])})")


if __name__ == "__main__":
    main()
