"""The nested int8 decode GEMV with and without GFNI: high nibbles moved down by one ``vgf2p8affineqb`` or by a
shift and an and (``int8_common.gfni_nibble_down``; at 3 and 4 bits), each run-time width of 8-bit nested storage.

One OLMoE-shaped projection (64 experts x [1024, 2048], group 64), the kernel built for the host's target with
``+gfni`` and with ``-gfni`` (``--mcpu haswell``: the AVX2 kernels, 8-row vectors), each on its own copy of the
stack. Two regimes: ``hot``, one expert routed every call (its rows stay in the L2: the kernel's own work), and
``cold``, 8 experts a call drawn in turn from 16 random sets (stacks far larger than the L3: memory). The two
builds alternate (hot: blocks of ``--calls`` calls, best of 5 blocks; cold: call by call, median), so they see
the same machine load; their outputs are checked bit-identical first::

    python benchmarks/nibble_split.py [--widths 2,3,4,8] [--threads 1] [--mcpu haswell]
"""

from __future__ import annotations

import argparse
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
from moec.lower.kernels.factory import compile_kernel, host_target, kernel_tile, make_nested_gemv
from moec.lower.kernels.layout import nested_kernel_layout, stack_kernel_layouts
from moec.quant.nested import nest
from moec.runtime.session import use_threads

N, K, GROUP, EXPERTS, TOP_K = 1024, 2048, 64, 64, 8


def _target(mcpu: str | None, gfni: bool) -> tvm.target.Target:
    base = host_target() if mcpu is None else tvm.target.Target({"kind": "llvm", "mcpu": mcpu})
    return tvm.target.Target({"kind": "llvm", "mcpu": base.attrs["mcpu"], "mattr": ["+gfni" if gfni else "-gfni"]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", default="2,3,4,8")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calls", type=int, default=200, help="Calls per hot block and cold calls per width.")
    ap.add_argument("--mcpu", default=None, help="Build for this LLVM CPU (haswell: the AVX2 kernels).")
    args = ap.parse_args()
    try:
        widths = [int(w) for w in args.widths.split(",")]
    except ValueError:
        ap.error("--widths takes comma-separated integers")
    if not set(widths) <= {2, 3, 4, 8} or args.threads < 1 or args.calls < 4:
        ap.error("--widths are 8-bit nested storage's (2, 3, 4, 8); --threads at least 1, --calls at least 4")
    targets = {"with GFNI": _target(args.mcpu, True), "without": _target(args.mcpu, False)}
    if not codegen.target_has_features("avx2", targets["without"]):
        ap.error(f"--mcpu {args.mcpu}: not an x86 CPU with AVX2 that LLVM knows (the int8 nested GEMV needs one)")
    dev, rng = tvm.cpu(), np.random.default_rng(0)
    use_threads(args.threads)
    tile = kernel_tile(targets["without"], N, None, "int8")
    layouts = [nested_kernel_layout(nest(_random_packed(8, N, K, GROUP, rng)), tile) for _ in range(EXPERTS)]
    stack = stack_kernel_layouts(layouts)
    names = [f"seg{s}" for s in range(4)] + ["scale", "zero"]
    builds = {label: (compile_kernel(make_nested_gemv(8, N, K, GROUP, EXPERTS, TOP_K, t, activations="int8"), t),
                      [tvm.runtime.tensor(stack[a], dev) for a in names]) for label, t in targets.items()}
    x = tvm.runtime.tensor(rng.standard_normal((1, K)).astype(np.float32), dev)
    ys = {label: tvm.runtime.tensor(np.zeros((TOP_K, N), np.float32), dev) for label in builds}
    one = tvm.runtime.tensor(np.array([5] + [-1] * (TOP_K - 1), np.int32), dev)  # one routed row: the hot regime
    routed = [tvm.runtime.tensor(rng.choice(EXPERTS, TOP_K, replace=False).astype(np.int32), dev) for _ in range(16)]
    print(f"\n## Nested int8 GEMV, high nibbles by vgf2p8affineqb or by shift and mask "
          f"({targets['without'].attrs['mcpu']}, {args.threads} thread(s); load average {os.getloadavg()[0]:.1f})\n")
    print("| width | hot µs with GFNI | hot µs without | hot ratio | cold µs with GFNI | cold µs without | cold ratio |")
    print("|---|---|---|---|---|---|---|")
    for w in widths:
        prec = tvm.runtime.tensor(np.full(EXPERTS, w, np.int32), dev)
        for label, (mod, arrays) in builds.items():
            mod["gemv"](x, *arrays, prec, routed[0], ys[label])
        first, second = (ys[label].numpy() for label in builds)
        if not np.array_equal(first, second):
            sys.exit(f"error: the two builds differ at {w} bits")
        hot = {label: [] for label in builds}
        for _ in range(5):
            for label, (mod, arrays) in builds.items():
                f = mod["gemv"]
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    f(x, *arrays, prec, one, ys[label])
                hot[label].append((time.perf_counter() - t0) / args.calls * 1e6)
        cold = {label: [] for label in builds}
        for c in range(args.calls):
            for v, (label, (mod, arrays)) in enumerate(builds.items()):
                t0 = time.perf_counter()
                mod["gemv"](x, *arrays, prec, routed[(c + 5 * v) % len(routed)], ys[label])
                cold[label].append((time.perf_counter() - t0) * 1e6)
        h = {label: min(t) for label, t in hot.items()}
        c_ = {label: statistics.median(t[3:]) for label, t in cold.items()}
        print(f"| {w} | {h['with GFNI']:.1f} | {h['without']:.1f} | {h['with GFNI'] / h['without']:.2f} | "
              f"{c_['with GFNI']:.0f} | {c_['without']:.0f} | {c_['with GFNI'] / c_['without']:.2f} |", flush=True)
    print(f"\n(ratio: time with GFNI / without. The 2- and 8-bit GEMVs do not use the instruction:"
          f" their rows are the two builds' code-layout noise. Load average {os.getloadavg()[0]:.1f} at the end)")


if __name__ == "__main__":
    main()
