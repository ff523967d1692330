"""How evenly the int8 grouped GEMM's tasks split between threads for a real prompt's routing.

Records the expert offsets of every routed-expert grouped GEMM of one prefill (VM instrument hook),
costs each task by its token blocks (ceil(tokens / 4)), cuts the task list into TVM's contiguous
per-thread ranges and prints the parallel efficiency (mean / busiest thread; 1 = even) for the
kernel's task order with ``gemm_split`` parts (1 = expert-major)::

    python benchmarks/gemm_balance.py BUNDLE --tokens 512 --tiles 16 --threads 2,4
"""

from __future__ import annotations

import argparse

import numpy as np


def efficiency(counts: np.ndarray, tiles: int, split: int, threads: int) -> float:
    """Mean / busiest thread's token blocks with the kernel's task order (see ``x86_vnni_gemm``)."""
    experts, split = len(counts), max(1, min(split, tiles))
    per = -(-tiles // split)
    cost = []
    for task in range(split * experts * per):
        tile = task // (experts * per) * per + task % per
        cost.append(np.ceil(counts[task // per % experts] / 4) if tile < tiles else 0.0)
    step = -(-len(cost) // threads)
    parts = [sum(cost[i * step:(i + 1) * step]) for i in range(threads)]
    return sum(cost) / threads / max(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--tiles", type=int, default=16, help="tasks per expert (N / 16 / gemm_vectors)")
    ap.add_argument("--threads", default="2,4")
    ap.add_argument("--splits", default="1,2,4")
    args = ap.parse_args()
    from moec.runtime.session import BundleSession

    s = BundleSession(args.bundle, threads=1)
    offsets = []

    def hook(func, sym, before, ret, *a):
        if before and sym.startswith("gemm_") and sym.endswith("_i8") and "_s1_" not in sym:
            offsets.append(a[5].numpy().copy())  # (x, rows, weight, scale, zero, offsets, y)
        return 0

    s.vm.set_instrument(hook)
    s.prefill([3 + i % 97 for i in range(args.tokens)])
    for threads in map(int, args.threads.split(",")):
        for split in map(int, args.splits.split(",")):
            v = [efficiency(np.diff(o), args.tiles, split, threads) for o in offsets]
            print(f"{args.tokens} tokens, {len(offsets)} routed GEMM calls, {threads} threads, gemm_split "
                  f"{split}: parallel efficiency median {np.median(v):.3f}, min {min(v):.3f}")


if __name__ == "__main__":
    main()
