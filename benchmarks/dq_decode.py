"""Decode-GEMV time of double-quantized (``u8``) scales against fp16 scales, same shapes, interleaved rounds.

Variants (``--variants``): ``BITS/GROUP/SCALES``, e.g. ``4/64/fp16`` (plain int4, 4.31 bits a weight),
``4/32/fp16`` (4.63) and ``4/32/u8`` (4.44). Each variant's kernel is compiled once; then ``--rounds``
rounds time every variant in turn (hot: the same ``top_k`` experts every call, in cache; cold: a stack
of more than ``--cold-gb`` GB, the experts rotating so each is read from DRAM), and the medians over
rounds are printed with the effective bandwidth (``packed_nbytes`` of the experts read / time).

Usage: ``python benchmarks/dq_decode.py [--threads 2] [--rounds 5]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_bandwidth import best_time  # noqa: E402


def random_stack(bits, n, k, gs, scales, experts, tile, seed=0):
    """Random kernel-layout arrays (bandwidth does not depend on the values)."""
    from moec.core.formats import get_scale_format
    from moec.lower.kernels.layout import num_tiles, zero_words
    rng = np.random.default_rng(seed)
    nt, groups = num_tiles(n, tile), k // gs
    out = [rng.integers(0, 2**32, (experts, nt, k * bits // 32, tile), dtype=np.uint32)]
    fmt = get_scale_format(scales)
    if fmt.double_quantized:
        out.append(rng.integers(1, 256, (experts, nt, groups, tile), dtype=np.uint8))
        out.append((rng.random((experts, nt, -(-groups // fmt.super_groups), tile), np.float32) * 1e-4 + 1e-5)
                   .astype(np.float16))
    else:
        out.append((rng.random((experts, nt, groups, tile), np.float32) * 0.01 + 1e-3).astype(np.float16))
    out.append(rng.integers(0, 2**32, (experts, nt, zero_words(groups, bits), tile), dtype=np.uint32))
    return out


class Variant:
    def __init__(self, spec, n, k, experts, top_k, cold_gb):
        import tvm
        from moec.lower.kernels.factory import compile_kernel, host_target, make_gemv
        from moec.lower.schedules import kernel_tile
        from moec.quant.pack import packed_nbytes
        b, g, s = spec.split("/")
        self.spec, self.bits, self.gs, self.scales = spec, int(b), int(g), s
        self.nbytes = packed_nbytes(n, k, self.bits, self.gs, s)["total"]
        target = host_target()
        tile = kernel_tile(target, n, self.bits, "float32")  # make_gemv's default activations below
        dev = tvm.cpu()
        self.cold_experts = max(top_k, int(cold_gb * 1e9 // self.nbytes) // top_k * top_k)
        self.fns, self.args = {}, {}
        for mode, e in (("hot", experts), ("cold", self.cold_experts)):
            fn = compile_kernel(make_gemv(self.bits, n, k, self.gs, e, top_k, target, scales=s), target)["gemv"]
            ws = [tvm.runtime.tensor(a, dev) for a in random_stack(self.bits, n, k, self.gs, s, e, tile)]
            x = tvm.runtime.tensor(np.random.default_rng(1).standard_normal((1, k)).astype(np.float32), dev)
            y = tvm.runtime.empty((top_k, n), "float32", dev)
            calls = e // top_k if mode == "cold" else 1
            ids = [tvm.runtime.tensor((np.arange(top_k) + c * top_k).astype(np.int32) % e, dev) for c in range(calls)]
            self.fns[mode], self.args[mode] = fn, (x, ws, ids, y)
        self.top_k = top_k

    def time(self, mode, repeat):
        fn, (x, ws, ids, y) = self.fns[mode], self.args[mode]
        if mode == "hot":
            return best_time(lambda: fn(x, *ws, ids[0], y), repeat, number=50)
        return best_time(lambda: [fn(x, *ws, i, y) for i in ids], repeat) / len(ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="4/64/fp16,4/32/fp16,4/32/u8,3/32/fp16,3/32/u8,2/32/fp16,2/32/u8")
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=8, help="stack of the hot kernel")
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--cold-gb", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read when TVM's thread pool starts
    print(f"load average before: {os.getloadavg()}", flush=True)
    variants = [Variant(s, args.n, args.k, args.experts, args.top_k, args.cold_gb) for s in args.variants.split(",")]
    times = {(v.spec, m): [] for v in variants for m in ("hot", "cold")}
    for _ in range(args.rounds):
        for m in ("hot", "cold"):
            for v in variants:
                times[(v.spec, m)].append(v.time(m, args.repeat))
    print(f"load average after: {os.getloadavg()}\n")
    print(f"[{args.n} x {args.k}] experts, top_k {args.top_k}, {args.threads} threads, median of {args.rounds} "
          f"interleaved rounds\n")
    print("| bits / group / scales | bits per weight | hot µs/call | hot GB/s | cold µs/call | cold GB/s |")
    print("|---|---|---|---|---|---|")
    for v in variants:
        hot, cold = (statistics.median(times[(v.spec, m)]) for m in ("hot", "cold"))
        read = v.nbytes * v.top_k
        print(f"| {v.spec} | {v.nbytes * 8 / (args.n * args.k):.3f} | {hot * 1e6:.1f} | {read / hot / 1e9:.1f} | "
              f"{cold * 1e6:.1f} | {read / cold / 1e9:.1f} |")


if __name__ == "__main__":
    main()
