"""Which per-expert loss weighting w_e gives the best held-out accuracy at equal memory (picks the default).

Every weighting (frequency, inverse-frequency, contribution, none) goes through the same exact
solver (``ilp``, accuracy term only: β = γ = 0) at the same budgets; each plan is evaluated on
held-out text with ``moec.api.evaluate``. Prints a markdown table.

Usage::

    python benchmarks/search_weighting.py [--profile out/reference-profile.json] [--budgets 0.5,0.6]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from search_common import Bench, ensure_profile  # noqa: E402

from moec.cli.search_cmd import parse_tensor_bits  # noqa: E402
from moec.search.cost import WEIGHTINGS, CostConfig  # noqa: E402
from moec.search.driver import SearchOptions, run_search  # noqa: E402
from moec.pipeline.search import uniform_memory_mb  # noqa: E402
from moec.search.problem import build_problem  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", type=Path, default=Path("out/reference-profile.json"))
    ap.add_argument("--budgets", default="0.55,0.6", help="Budgets as fractions of uniform INT8 weight MB.")
    ap.add_argument("--sensitivity", default="auto", choices=["auto", "exact", "proxy"])
    ap.add_argument("--tensor-specs", default="re:.*=8",
                    help="';'-separated non-expert bit specs to compare, e.g. 're:.*=8;re:.*=4;embeddings=4,re:.*=8'"
                         " (router float unless named).")
    ap.add_argument("--weightings", default=",".join(WEIGHTINGS), help="Comma-separated weightings to compare.")
    ap.add_argument("--heldout-tokens", type=int, default=16384)
    args = ap.parse_args()
    bench = Bench(ensure_profile(args.profile), heldout_tokens=args.heldout_tokens)
    int8 = uniform_memory_mb(bench.model, 8)
    specs = [parse_tensor_bits(t) for t in args.tensor_specs.split(";")]
    fp32 = bench.evaluate("FP32", None)
    print(f"FP32 held-out top-1 {fp32.top1:.4f}, perplexity {fp32.ppl:.3f}; uniform INT8 {int8:.3f} MB\n")
    print("| budget | non-expert bits | weighting | weight MB | avg expert bits | top-1 | Δ top-1 vs FP32 | perplexity |")
    print("|---|---|---|---|---|---|---|---|")
    for frac in (float(x) for x in args.budgets.split(",")):
        for tensors in specs:
            prob = build_problem(bench.model.cfg, bench.stats, frac * int8, bench.preset.allowed_bits, bench.norms,
                                 tensors, sensitivity=args.sensitivity)
            spec = ",".join(f"{k}={v}" for k, v in tensors.items() if k != "router")
            for w in args.weightings.split(","):
                res = run_search(prob, CostConfig(1.0, 0.0, 0.0, w), bench.estimator, SearchOptions(policy="ilp"))
                row = bench.evaluate(f"{w}@{frac}", res.plan)
                print(f"| {frac:.0%} INT8 ({frac * int8:.2f} MB) | {spec} | {w} | {row.mb:.3f} | "
                      f"{res.plan.average_expert_bits():.2f} | {row.top1:.4f} | {(row.top1 - fp32.top1) * 100:+.2f} pt "
                      f"| {row.ppl:.3f} |", flush=True)
    print(f"\nsensitivity source: {prob.loss_source}; router float; solver ilp (accuracy term only)")


if __name__ == "__main__":
    main()
