"""Prefill token rate of two or more bundles, interleaved in one process (a loaded machine's drift cancels).

Each round, in turn per bundle and prompt length: ``reset`` and one timed ``prefill`` of the first N
tokens of a fixed prompt, after one untimed prefill of the longest prompt per bundle (its pages read in,
the VM's buffers allocated). Prints the median tok/s per bundle and length, and each bundle's ratio
to the first. The bundles carry their own libraries, so bundles of two moec versions compare under
one runtime (the decode-step counterpart is ``step_ab.py``).

Usage::

    python benchmarks/prefill_ab.py BUNDLE_A BUNDLE_B [--prompts 64,512] [--rounds 6]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+")
    ap.add_argument("--prompts", default="64,512", help="prompt lengths, comma-separated")
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    try:
        lengths = [int(n) for n in args.prompts.split(",")]
    except ValueError:
        ap.error(f"--prompts wants comma-separated integers, got {args.prompts!r}")
    if not lengths or min(lengths) < 1 or args.rounds < 1:
        ap.error("--prompts lengths and --rounds must be at least 1")
    from moec.runtime.session import BundleSession

    prompt = [3 + i % 97 for i in range(max(lengths))]
    sessions = [BundleSession(b, trust_verified=True) for b in args.bundles]
    for s in sessions:
        s.prefill(prompt)
    rates: dict[str, dict[int, list[float]]] = {b: {n: [] for n in lengths} for b in args.bundles}
    print(f"load average before: {os.getloadavg()}")
    for _ in range(args.rounds):
        for b, s in zip(args.bundles, sessions):
            for n in lengths:
                s.reset()
                t0 = time.perf_counter()
                s.prefill(prompt[:n])
                rates[b][n].append(n / (time.perf_counter() - t0))
    print(f"load average after: {os.getloadavg()}")
    first = args.bundles[0]
    for b in args.bundles:
        cells = []
        for n in lengths:
            med = float(np.median(rates[b][n]))
            ratio = "" if b == first else f" ({med / float(np.median(rates[first][n])):.2f}x the first)"
            cells.append(f"{n} tokens {med:.0f} tok/s{ratio}")
        print(f"{b}: " + "; ".join(cells))


if __name__ == "__main__":
    main()
