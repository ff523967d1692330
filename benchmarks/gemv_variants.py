"""Cold decode GEMV under variants of the x86 schedule parameters, interleaved.

Compiles :func:`moec.lower.schedules.x86_vnni.vnni_gemv` (``--activations int8``, the default; AVX-512
VNNI) or the float32-activation GEMV (``--activations float32``: ``gemv_definition`` scheduled by
``x86.schedule_gemv``, any x86 host) once per variant (``X86Params`` fields as
a Python dict, e.g. ``"{'prefetch_words': 8}"``; ``"{}"`` is the default), checks that every variant
gives the default's output bit for bit, and times calls that rotate over four random stacks of
``--experts`` experts (more than the L3 cache, so every call reads its experts from DRAM), in rounds
that alternate the variants. A ``code_tile`` or ``layout_tile`` variant lays the same weights out in
its tiles (``"{'code_tile': 16}"``: 16-row tiles at 2-4 bits, x86's layout before 2026-12-03). Time is this thread's
CPU time (robust to preemption on a loaded
machine; run with ``TVM_NUM_THREADS=1`` so the kernel runs on this thread). GB/s = the selected
experts' canonical packed bytes per call / time per call. ``--routed R`` leaves R of the ``top_k``
rows routed (the others -1, at random), as a mixed plan's bit-class call sees them (``--routed 0``:
the call's cost besides its weights); ``--experts`` sizes the stacks (four of them rotate: at 2 bits,
256 experts are 0.6 GB, well past the L3).

Usage::

    TVM_NUM_THREADS=1 python benchmarks/gemv_variants.py --bits 4 "{}" "{'prefetch_words': 8}"
    TVM_NUM_THREADS=1 python benchmarks/gemv_variants.py --activations float32 --bits 4 "{}" "{'layout_tile': 128}"
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_bandwidth import expert_nbytes, random_stack  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+", help="X86Params overrides, a Python dict each")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--activations", choices=("int8", "float32"), default="int8")
    ap.add_argument("--routed", type=int, default=None,
                    help="routed rows per call (the rest -1, as in a mixed plan's class call; default all top_k; "
                         "0: none, what a call costs besides its weights: activation quantization, fork-join, zero rows)")
    args = ap.parse_args()
    if args.routed is not None and not 0 <= args.routed <= args.top_k:
        ap.error(f"--routed {args.routed} is not between 0 and --top-k {args.top_k}")
    import tvm

    from moec.lower.kernels.factory import compile_kernel, host_target
    from moec.lower.kernels.gemv import GemvSpec, gemv_definition
    from moec.lower.kernels.row_guard import guard_routed_rows
    from moec.lower.schedules import x86
    from moec.lower.schedules.x86_vnni import vnni_gemv

    def kernel(spec, params):
        if args.activations == "int8":
            return vnni_gemv(spec, params)
        return guard_routed_rows(x86.schedule_gemv(gemv_definition(spec), spec, params), spec.top_k)

    print(f"load average before: {os.getloadavg()}")
    params = [dataclasses.replace(x86.PARAMS, **ast.literal_eval(v)) for v in args.variants]
    tiles = [p.tile_for(args.n, args.bits, args.activations) for p in params]  # a tile variant: the same weights re-tiled
    fns = [compile_kernel(kernel(GemvSpec(args.bits, args.n, args.k, args.group_size, args.experts, args.top_k,
                                          t), p), host_target())["gemv"] for p, t in zip(params, tiles)]
    by_tile = {t: [[tvm.runtime.tensor(a) for a in random_stack(args.bits, args.n, args.k, args.group_size,
                                                                args.experts, t, seed=s)] for s in range(4)]
               for t in sorted(set(tiles))}
    x = tvm.runtime.tensor(np.random.default_rng(1).standard_normal((1, args.k)).astype(np.float32))
    ys = [tvm.runtime.empty((args.top_k, args.n), "float32", tvm.cpu()) for _ in fns]
    calls = args.experts // args.top_k
    rng = np.random.default_rng(2)
    routed = args.top_k if args.routed is None else args.routed
    ids = []
    for c in range(calls):
        row = (np.arange(args.top_k) + c * args.top_k).astype(np.int32)
        row[rng.permutation(args.top_k)[routed:]] = -1
        ids.append(tvm.runtime.tensor(row))
    for f, y, t in zip(fns, ys, tiles):
        f(x, *by_tile[t][0], ids[0], y)
        same = (np.array_equal(ys[0].numpy(), y.numpy()) if args.activations == "int8"  # integer sums: exact
                else np.allclose(ys[0].numpy(), y.numpy(), rtol=1e-4, atol=1e-4 * np.abs(ys[0].numpy()).max()))
        if not same:
            raise SystemExit("a variant's output differs from the first variant's")
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(args.rounds):
        for i, f in enumerate(fns):
            t0 = time.thread_time()
            for st in by_tile[tiles[i]]:
                for idv in ids:
                    f(x, *st, idv, ys[i])
            times[i].append((time.thread_time() - t0) / (len(by_tile[tiles[i]]) * calls))
    nbytes = expert_nbytes(args.bits, args.n, args.k, args.group_size) * routed
    for v, ts in zip(args.variants, times):
        rate = (f", {nbytes / np.median(ts) / 1e9:.1f} GB/s (best round {nbytes / min(ts) / 1e9:.1f})"
                if nbytes else "")
        print(f"{args.bits}-bit {v}: cold median {np.median(ts) * 1e6:.1f} us/call{rate}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
