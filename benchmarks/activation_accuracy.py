"""What int8 activations cost in accuracy: each plan's bundle with float32 and with int8 activations, scored
by its own kernels on the same windows (``moec eval BUNDLE``), paired.

``--activations int8`` quantizes each activation row to 8 bits per group before the decode GEMVs' and
prefill GEMMs' integer dot products (the numerics of llama.cpp's quantized matmuls, which quantize
activations to Q8_0 / Q8_K blocks). This measures the accuracy it costs, per plan and per text:
perplexity and top-1 of both bundles (:func:`moec.pipeline.bundle_eval.evaluate_bundle`: every window
teacher-forced through the decode step), and the int8 − float32 difference in top-1 (points) and in
mean NLL with 95 % bootstrap intervals over windows (:func:`moec.profile.paired.paired`: both scored on
the same resampled windows). The float32 bundles score like torch's fake quantization of the same plan
(``tests/pipeline/test_bundle_eval.py``); the float model's row is torch's.

Bundles are built into ``--work`` and reused (``peer_bundles.build_bundles``: uniform:B per ``--bits``
and the peer benchmark's documented mixed plan; a ``--work`` shared with ``peer_llamacpp.py`` reuses its
bundles).

Usage::

    python benchmarks/activation_accuracy.py reference/checkpoint --work /work/bench-data/peer7/reference \\
        --data reference/data/heldout.txt,reference/data/licenses.txt
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peer_bundles import MIXED, build_bundles  # noqa: E402

from moec.api import DataConfig, evaluate, evaluate_bundle  # noqa: E402
from moec.profile.paired import paired  # noqa: E402

MODES = ("float32", "int8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--work", type=Path, required=True, help="bundles are built here and reused")
    ap.add_argument("--data", default="reference/data/heldout.txt,reference/data/licenses.txt",
                    help="comma-separated text files, one table block each")
    ap.add_argument("--bits", default="8,4,3,2", help="uniform:B plans")
    ap.add_argument("--no-mixed", action="store_true", help="leave out the peer benchmark's mixed 2/4 plan")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=None, help="tokens of each text to use (default all)")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    bits = [int(b) for b in args.bits.split(",")]
    bundles, _ = build_bundles(args.checkpoint, args.work, bits, list(MODES), not args.no_mixed)
    plans = [f"uniform:{b}" for b in bits] + ([] if args.no_mixed else [MIXED])
    for path in args.data.split(","):
        data = DataConfig(path=path, seq_len=args.seq_len, max_tokens=args.max_tokens)
        base = evaluate(args.checkpoint, data, progress=False).result
        print(f"\n{Path(path).name}: int8 vs float32 activations, {args.checkpoint}, {base.tokens} scored tokens "
              f"(windows of {args.seq_len}); Δ = int8 − float32, 95 % bootstrap interval over windows; "
              f"float model (torch): perplexity {base.perplexity:.3f}, top-1 {100 * base.top1:.2f} %\n")
        print("| plan | bundle MB (int8) | perplexity float32 → int8 | Δ perplexity | top-1 float32 → int8 "
              "| Δ top-1 (points) | Δ mean NLL (nats) |")
        print("|---|---|---|---|---|---|---|", flush=True)
        for plan in plans:
            f32, i8 = (evaluate_bundle(bundles[(plan, m)], data, progress=False) for m in MODES)
            d = paired(f32.scores.correct, i8.scores.correct, f32.scores.nll, i8.scores.nll)
            a, b = f32.result, i8.result
            print(f"| {plan} | {i8.file_bytes / 1e6:.2f} | {a.perplexity:.3f} → {b.perplexity:.3f} "
                  f"| {100 * (b.perplexity / a.perplexity - 1):+.2f} % | {100 * a.top1:.2f} → {100 * b.top1:.2f} % "
                  f"| {100 * d.top1_diff:+.2f} [{100 * d.top1_lo:+.2f}, {100 * d.top1_hi:+.2f}] "
                  f"| {d.nll_diff:+.4f} [{d.nll_lo:+.4f}, {d.nll_hi:+.4f}] |", flush=True)


if __name__ == "__main__":
    main()
