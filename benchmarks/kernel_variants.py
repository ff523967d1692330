"""The decode GEMVs, fixed and nested, under variants of the x86 schedule parameters, interleaved.

For each width (2/3/4/8 bits) and each variant (``X86Params`` fields as a Python dict, ``"{}"`` the
defaults; ``x86.gemv_params`` then applies the target's lanes and AVX2 blocks, so ``"{'avx2_lanes': 16}"``
is the 16-lane float schedule on an AVX2 host), the fixed GEMV and the nested one (8-bit storage at
that width) of ``--activations`` (float32, or int8: VNNI or AVX2 kernels) are compiled, their weights
laid out in the variant's tiles, and called in turn, call by call (the machine's load hits every
variant alike): 64 experts x [1024, 2048], top-8, group 64, random routing; wall time at the TVM
threads of the run. A width with no fixed kernel of that activation type (int8 at 3 bits on AVX2)
times the float32 fixed kernel a bundle would run instead (marked).

Usage::

    TVM_NUM_THREADS=2 python benchmarks/kernel_variants.py "{'avx2_lanes': 16}" "{}"
    TVM_NUM_THREADS=2 python benchmarks/kernel_variants.py --activations int8 "{}" "{'avx2_int8_chains': 1}"
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
    ap.add_argument("--activations", choices=("float32", "int8"), default="float32")
    ap.add_argument("--bits", default="2,3,4,8", help="Widths, comma-separated.")
    args = ap.parse_args()
    import tvm

    from dynamic import _random_packed
    from moec.core.errors import MoecError
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
    acts = args.activations
    base = x86.PARAMS

    def per_variant(fn):
        """``fn()`` under each variant's parameters (x86.PARAMS swapped in while it runs)."""
        out = []
        for v in variants:
            x86.PARAMS = dataclasses.replace(base, **v)
            try:
                out.append(fn())
            finally:
                x86.PARAMS = base
        return out

    def tensors(stack, names):
        return [tvm.runtime.tensor(stack[a], dev) for a in names]

    nested_names = [f"seg{s}" for s in range(4)] + ["scale", "zero"]
    nargs = per_variant(lambda: tensors(stack_kernel_layouts(
        [nested_kernel_layout(nw, kernel_tile(target, n, None, acts)) for nw in nws]), nested_names))
    nmods = per_variant(lambda: compile_kernel(make_nested_gemv(8, n, k, gs, experts, top_k, target,
                                                                activations=acts), target))
    print(f"load average {os.getloadavg()[0]:.1f}; TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS', 'unset')}\n")
    print(f"| bits | variant | lanes | fixed µs/call ({acts}) | nested µs/call ({acts}) | nested / fixed |")
    print("|---|---|---|---|---|---|")
    for bits in [int(b) for b in args.bits.split(",")]:
        pws = [_random_packed(bits, n, k, gs, rng) for _ in range(experts)]
        try:
            make_gemv(bits, n, k, gs, experts, top_k, target, activations=acts)
            fixed_acts = acts
        except MoecError:  # no fixed kernel of this width and type here: the float32 one a bundle runs
            fixed_acts = "float32"
        fargs = per_variant(lambda: tensors(stack_kernel_layouts(
            [to_kernel_layout(p, kernel_tile(target, n, bits, fixed_acts)) for p in pws]), ("weight", "scale", "zero")))
        prec = tvm.runtime.tensor(np.full(experts, bits, np.int32), dev)
        fmods = per_variant(lambda: compile_kernel(make_gemv(bits, n, k, gs, experts, top_k, target,
                                                             activations=fixed_acts), target))
        y = tvm.runtime.tensor(np.zeros((top_k, n), np.float32), dev)
        times = {(i, kind): [] for i in range(len(variants)) for kind in "fn"}
        for c in range(args.calls):
            for i in range(len(variants)):
                t0 = time.perf_counter()
                fmods[i]["gemv"](x, *fargs[i], ids[c % 16], y)
                t1 = time.perf_counter()
                nmods[i]["gemv"](x, *nargs[i], prec, ids[c % 16], y)
                times[(i, "f")].append(t1 - t0)
                times[(i, "n")].append(time.perf_counter() - t1)
        for i, v in enumerate(variants):
            x86.PARAMS = dataclasses.replace(base, **v)
            lanes = x86.gemv_params(target).lanes
            x86.PARAMS = base
            f = statistics.median(times[(i, "f")][3:]) * 1e6
            nn = statistics.median(times[(i, "n")][3:]) * 1e6
            mark = "" if fixed_acts == acts else f" (fixed: {fixed_acts})"
            print(f"| {bits}{mark} | {args.variants[i]} | {lanes} | {f:.0f} | {nn:.0f} | {nn / f:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
