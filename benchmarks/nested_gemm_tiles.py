"""The nested prefill grouped GEMM alone on nested stacks laid out in tiles of different row counts.

The int8 nested GEMV's layout tile decides the tile the prefill's nested grouped GEMM reads (one layout
in the bundle), so this prints what a tile costs the GEMM: OLMoE-shaped defaults (N 1024, K 2048,
group 64, 64 experts, 8-bit storage), ``--rows`` routed rows spread over the experts at random, every
expert at the run-time ``--bits`` width; median wall time of ``--calls`` calls, the tiles interleaved
call by call so both see the same machine load::

    python benchmarks/nested_gemm_tiles.py --bits 8,4,2 --tiles 16,64
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", default="8,4,2", help="Run-time widths, comma-separated (of 8-bit storage).")
    ap.add_argument("--tiles", default="16,64", help="Layout tiles (rows), comma-separated; the first is the base.")
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--rows", type=int, default=512, help="Routed rows (prompt tokens x top-k).")
    ap.add_argument("--calls", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read when TVM's pool starts (the first call)

    import numpy as np
    import tvm

    from moec.lower.kernels.factory import compile_kernel, host_target
    from moec.lower.kernels.layout import nested_kernel_layout, stack_kernel_layouts
    from moec.lower.kernels.nested_grouped import NestedGroupedSpec, nested_grouped_definition
    from moec.lower.schedules import x86
    from moec.quant.nested import nest
    from moec.quant.packed_model import pack_weight

    n, k, gs, experts = args.n, args.k, args.group, args.experts
    tiles = [int(t) for t in args.tiles.split(",")]
    rng, dev = np.random.default_rng(0), tvm.cpu()
    nws = [nest(pack_weight((rng.standard_normal((n, k)) * 0.05).astype(np.float32), 8, gs))] * experts
    offsets = np.concatenate([[0], np.cumsum(rng.multinomial(args.rows, [1 / experts] * experts))]).astype(np.int32)
    x = rng.standard_normal((args.rows, k)).astype(np.float32)
    stacks = {t: stack_kernel_layouts([nested_kernel_layout(nw, t) for nw in nws]) for t in tiles}
    mods = {t: compile_kernel(nested_grouped_definition(NestedGroupedSpec(8, n, k, gs, experts, t),
                                                        x86.grouped_gemm_params()), host_target()) for t in tiles}
    print(f"\n## Nested grouped GEMM by layout tile ({experts} experts x [{n}, {k}], group {gs}, {args.rows} routed "
          f"rows, {args.threads} threads; median of {args.calls} interleaved calls; load average "
          f"{os.getloadavg()[0]:.1f})\n")
    print("| width | " + " | ".join(f"{t}-row ms" for t in tiles) + " | " +
          " | ".join(f"{t} / {tiles[0]}" for t in tiles[1:]) + " |")
    print("|---" * (2 * len(tiles)) + "|")
    for bits in (int(b) for b in args.bits.split(",")):
        calls = {}
        for t in tiles:
            st = stacks[t]
            calls[t] = [tvm.runtime.tensor(a, dev) for a in (x, *(st[f"seg{s}"] for s in range(4)), st["scale"],
                        st["zero"], np.full(experts, bits, np.int32), offsets, np.zeros((args.rows, n), np.float32))]
        times = {t: [] for t in tiles}
        for _ in range(args.calls):
            for t in tiles:
                t0 = time.perf_counter()
                mods[t]["grouped_gemm"](*calls[t])
                times[t].append(time.perf_counter() - t0)
        med = {t: statistics.median(v[2:]) * 1e3 for t, v in times.items()}
        print(f"| {bits} | " + " | ".join(f"{med[t]:.1f}" for t in tiles) + " | " +
              " | ".join(f"{med[t] / med[tiles[0]]:.2f}x" for t in tiles[1:]) + " |", flush=True)


if __name__ == "__main__":
    main()
