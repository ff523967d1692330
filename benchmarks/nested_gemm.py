"""The nested prefill grouped GEMM alone: int8 and float32 activations next to the fixed int8 grouped GEMM.

One OLMoE-shaped projection (``--experts`` experts x [N, K], group ``--group``; 8-bit nested storage in the
layout tile of the int8 nested GEMV), a prompt of ``--tokens`` tokens routed top-``--top-k`` at random over
the experts (``--target x86-64-v3``: the AVX2 kernels, built for that preset and run on this host). For each
run-time width: the nested grouped GEMM with int8 activations
(``int8_nested_gemm``, AVX-512 VNNI), the nested one with float32 activations (``nested_grouped``, what the
nested prefill ran before) and the fixed int8 grouped GEMM of a stack quantized at that width; median wall
time of ``--calls`` calls, the three interleaved call by call so they see the same machine load::

    python benchmarks/nested_gemm.py --bits 8,4,3,2 --tokens 64,256
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", default="8,4,3,2", help="Run-time widths, comma-separated (of 8-bit storage).")
    ap.add_argument("--tokens", default="64,256", help="Prompt lengths, comma-separated.")
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--calls", type=int, default=11)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--target", default="host",
                    help="A moec target preset the kernels are built for (x86-64-v3: the AVX2 kernels), run here.")
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # read when TVM's pool starts (the first call)

    import numpy as np
    import tvm

    from moec.core.errors import MoecError
    from moec.core.formats import get_nested_format
    from moec.core.targets import load_target
    from moec.lower.kernels.factory import compile_kernel, host_target, make_grouped_gemm, make_nested_grouped_gemm
    from moec.lower.kernels.layout import nested_kernel_layout, stack_kernel_layouts, to_kernel_layout
    from moec.lower.schedules import kernel_tile
    from moec.quant.nested import nest
    from moec.quant.packed_model import pack_weight

    n, k, gs, experts = args.n, args.k, args.group, args.experts
    widths = [int(b) for b in args.bits.split(",")]
    if experts % 4 or experts < 4:
        raise SystemExit(f"moec: --experts must be a positive multiple of 4 (4 distinct weights repeated), got {experts}")
    served = get_nested_format(8).derived_bits
    if any(b not in served for b in widths):
        raise SystemExit(f"moec: --bits takes widths of 8-bit nested storage ({', '.join(map(str, served))}), "
                         f"got {args.bits}")
    try:
        target = host_target() if args.target == "host" else load_target(args.target).tvm()
        nested_i8 = compile_kernel(make_nested_grouped_gemm(8, n, k, gs, experts, target, "int8", activations="int8"),
                                   target)
    except MoecError as err:
        raise SystemExit(f"moec: {err}")
    nested_f32 = compile_kernel(make_nested_grouped_gemm(8, n, k, gs, experts, target, "int8"), target)
    rng, dev = np.random.default_rng(0), tvm.cpu()
    # distinct experts (a stack far larger than the caches); 4 distinct weights repeated keep the setup short
    base = [(rng.standard_normal((n, k)) * 0.05).astype(np.float32) for _ in range(4)]
    weights = [base[e % 4] for e in range(experts)]
    nested = stack_kernel_layouts([nested_kernel_layout(nest(pack_weight(w, 8, gs)), kernel_tile(target, n, None, "int8"))
                                   for w in weights[:4]])
    nested = {name: np.concatenate([a] * (experts // 4)) for name, a in nested.items()}
    segs = [nested[f"seg{s}"] for s in range(4)]
    print(f"\n## Nested prefill grouped GEMM ({experts} experts x [{n}, {k}], group {gs}, top-{args.top_k}, "
          f"{args.threads} threads, target {args.target}; median of {args.calls} interleaved calls; load average "
          f"{os.getloadavg()[0]:.1f})\n")
    print("| width | tokens | nested int8 ms | nested float32 ms | fixed int8 ms | nested int8 / fixed speed | "
          "int8 / float32 nested speed |")
    print("|---|---|---|---|---|---|---|")
    for bits in widths:
        try:
            fixed = compile_kernel(make_grouped_gemm(bits, n, k, gs, experts, target, activations="int8",
                                                     layout_activations="int8"), target)
        except MoecError:  # (no AVX2 3-bit int8 GEMM: such a fixed bundle prefills on float32 activations)
            fixed = None
        if fixed is not None:
            fstack = stack_kernel_layouts([to_kernel_layout(pack_weight(w, bits, gs),
                                                            kernel_tile(target, n, bits, "int8")) for w in weights[:4]])
            fstack = {name: np.concatenate([a] * (experts // 4)) for name, a in fstack.items()}
        for tokens in (int(t) for t in args.tokens.split(",")):
            pairs = tokens * args.top_k
            ids = np.stack([rng.choice(experts, args.top_k, replace=False) for _ in range(tokens)]).reshape(-1)
            order = np.argsort(ids, kind="stable")
            rows = (order // args.top_k).astype(np.int32)
            offsets = np.searchsorted(ids[order], np.arange(experts + 1)).astype(np.int32)
            x = rng.standard_normal((tokens, k)).astype(np.float32)
            prec = np.full(experts, bits, np.int32)
            t = lambda a: tvm.runtime.tensor(a, dev)  # noqa: E731
            calls = {
                "nested int8": (nested_i8, [t(a) for a in (x, rows, *segs, nested["scale"], nested["zero"], prec,
                                                           offsets, np.zeros((pairs, n), np.float32))]),
                "nested float32": (nested_f32, [t(a) for a in (x[rows], *segs, nested["scale"], nested["zero"], prec,
                                                               offsets, np.zeros((pairs, n), np.float32))]),
            }
            if fixed is not None:
                calls["fixed int8"] = (fixed, [t(a) for a in (x, rows, fstack["weight"], fstack["scale"],
                                                              fstack["zero"], offsets, np.zeros((pairs, n), np.float32))])
            times = {name: [] for name in calls}
            for _ in range(args.calls):
                for name, (mod, argv) in calls.items():
                    t0 = time.perf_counter()
                    mod["grouped_gemm"](*argv)
                    times[name].append(time.perf_counter() - t0)
            med = {name: statistics.median(v[1:]) * 1e3 for name, v in times.items()}
            fixed_cells = (f"{med['fixed int8']:.1f} | {med['fixed int8'] / med['nested int8']:.2f}x"
                           if fixed is not None else "no int8 kernel | –")
            print(f"| {bits} | {tokens} | {med['nested int8']:.1f} | {med['nested float32']:.1f} | {fixed_cells} | "
                  f"{med['nested float32'] / med['nested int8']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
