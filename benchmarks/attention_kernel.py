"""The prefill attention kernel (``causal_attention``) of this checkout against another checkout's, alone.

Usage::

    python benchmarks/attention_kernel.py --baseline /path/to/main-checkout --threads 2 --tokens 64,512

Both kernels are compiled for the host at the reference model's shape (4 heads, 2 KV heads, head dim
64; ``--shape H,KV,D``), run on the same random prompt (no cached keys) in this process at
``--threads`` (TVM's pool is made at that size), and timed as the best of 7 runs of 20 calls (CPU
time of this thread at 1 thread, wall time otherwise). GFLOP/s counts the causal half of the score
and value products; ``same`` says whether the outputs are bit-identical.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", type=Path, required=True, help="a checkout whose kernel is the baseline")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", default="64,512")
    ap.add_argument("--shape", default="4,2,64", help="heads,kv_heads,head_dim")
    args = ap.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)  # before TVM makes its pool
    import numpy as np
    import tvm

    from moec.lower.kernels.attention import causal_attention_kernel
    from moec.lower.kernels.factory import compile_kernel, host_target

    spec = importlib.util.spec_from_file_location("baseline_attention",
                                                  args.baseline / "moec/lower/kernels/attention.py")
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    heads, kv, d = (int(x) for x in args.shape.split(","))
    target = host_target()
    mods = {"baseline": compile_kernel(base.causal_attention_kernel(heads, kv, d, d), target),
            "this": compile_kernel(causal_attention_kernel(heads, kv, d, d), target)}
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    rng = np.random.default_rng(0)
    print(f"load average {os.getloadavg()[0]:.2f}, {args.threads} thread(s)")
    print("| prompt tokens | baseline ms | this ms | baseline GFLOP/s | this GFLOP/s | same |")
    print("|---|---|---|---|---|---|")
    for n in (int(x) for x in args.tokens.split(",")):
        arrays = [(rng.standard_normal((n, heads, d)) * 0.1).astype(np.float32),
                  rng.standard_normal((kv, d, n)).astype(np.float32),
                  rng.standard_normal((kv, n, d)).astype(np.float32)]
        best, outs = {}, {}
        for name, mod in mods.items():
            call = [tvm.runtime.tensor(a) for a in arrays + [np.zeros((n, heads, d), np.float32)]]
            fn = mod["causal_attention"]
            fn(*call)
            best[name] = float("inf")
            for _ in range(7):
                t0 = clock()
                for _ in range(20):
                    fn(*call)
                best[name] = min(best[name], (clock() - t0) / 20)
            outs[name] = call[-1].numpy()
        flops = 2 * 2 * heads * d * n * (n + 1) / 2
        same = np.array_equal(outs["baseline"], outs["this"])
        print(f"| {n} | {best['baseline'] * 1e3:.3f} | {best['this'] * 1e3:.3f} | "
              f"{flops / best['baseline'] / 1e9:.0f} | {flops / best['this'] / 1e9:.0f} | {same} |")


if __name__ == "__main__":
    sys.exit(main())
