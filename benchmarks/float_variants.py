"""The float32-activation decode GEMVs, fixed and nested, under variants of the x86 schedule parameters.

For each width (2/3/4/8 bits) and each variant (``X86Params`` fields as a Python dict, ``"{}"`` the
defaults; ``x86.gemv_params`` then applies the target's lanes, so ``"{'avx2_lanes': 16}"`` is the
16-lane schedule on an AVX2 host), the fixed GEMV and the nested one (8-bit storage at that width)
are compiled and called in turn, call by call (the machine's load hits every variant alike): 64
experts x [1024, 2048], top-8, group 64, random routing; wall time at the TVM threads of the run.

Usage::

    TVM_NUM_THREADS=2 python benchmarks/float_variants.py "{'avx2_lanes': 16}" "{}"
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+", help="X86Params overrides, a Python dict each")
    ap.add_argument("--calls", type=int, default=40)
    args = ap.parse_args()
    import tvm

    from dynamic import _random_packed
    from moec.lower.kernels.factory import compile_kernel, host_target, make_gemv, make_nested_gemv
    from moec.lower.kernels.layout import nested_kernel_layout, stack_kernel_layouts, to_kernel_layout
    from moec.lower.schedules import kernel_tile, x86
    from moec.quant.nested import nest

    variants = []
    for v in args.variants:
        try:
            variants.append(dict(ast.literal_eval(v)))
        except (ValueError, SyntaxError, TypeError):
            ap.error(f"variant {v!r} is not a Python dict of X86Params fields")
    from moec.lower.schedules.x86 import X86Params
    fields = {f.name for f in dataclasses.fields(X86Params)}
    for v in variants:
        if set(v) - fields:
            ap.error(f"unknown X86Params field(s) {', '.join(sorted(set(v) - fields))}")
    n, k, gs, experts, top_k = 1024, 2048, 64, 64, 8
    target, dev, rng = host_target(), tvm.cpu(), np.random.default_rng(0)
    x = tvm.runtime.tensor(rng.standard_normal((1, k)).astype(np.float32), dev)
    ids = [tvm.runtime.tensor(rng.choice(experts, top_k, replace=False).astype(np.int32), dev) for _ in range(16)]
    nws = [nest(_random_packed(8, n, k, gs, rng)) for _ in range(experts)]
    nst = stack_kernel_layouts([nested_kernel_layout(nw, kernel_tile(target, n, None, "float32")) for nw in nws])
    nargs = [tvm.runtime.tensor(nst[f"seg{s}"], dev) for s in range(4)] + [
        tvm.runtime.tensor(nst[a], dev) for a in ("scale", "zero")]
    base = x86.PARAMS

    def build(make, *a):
        mods = []
        for v in variants:
            x86.PARAMS = dataclasses.replace(base, **v)
            mods.append(compile_kernel(make(*a, target), target))
        x86.PARAMS = base
        return mods

    nmods = build(make_nested_gemv, 8, n, k, gs, experts, top_k)
    print(f"load average {os.getloadavg()[0]:.1f}; TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS', 'unset')}\n")
    print("| bits | variant | lanes | fixed µs/call | nested µs/call | nested / fixed |")
    print("|---|---|---|---|---|---|")
    for bits in (2, 3, 4, 8):
        pws = [_random_packed(bits, n, k, gs, rng) for _ in range(experts)]
        st = stack_kernel_layouts([to_kernel_layout(p, kernel_tile(target, n, bits, "float32")) for p in pws])
        fargs = [tvm.runtime.tensor(st[a], dev) for a in ("weight", "scale", "zero")]
        prec = tvm.runtime.tensor(np.full(experts, bits, np.int32), dev)
        fmods = build(make_gemv, bits, n, k, gs, experts, top_k)
        y = tvm.runtime.tensor(np.zeros((top_k, n), np.float32), dev)
        times = {(i, kind): [] for i in range(len(variants)) for kind in "fn"}
        for c in range(args.calls):
            for i in range(len(variants)):
                t0 = time.perf_counter()
                fmods[i]["gemv"](x, *fargs, ids[c % 16], y)
                t1 = time.perf_counter()
                nmods[i]["gemv"](x, *nargs, prec, ids[c % 16], y)
                times[(i, "f")].append(t1 - t0)
                times[(i, "n")].append(time.perf_counter() - t1)
        for i, v in enumerate(variants):
            x86.PARAMS = dataclasses.replace(base, **v)
            lanes = x86.gemv_params(target).lanes
            x86.PARAMS = base
            f = statistics.median(times[(i, "f")][3:]) * 1e6
            nn = statistics.median(times[(i, "n")][3:]) * 1e6
            print(f"| {bits} | {args.variants[i]} | {lanes} | {f:.0f} | {nn:.0f} | {nn / f:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
