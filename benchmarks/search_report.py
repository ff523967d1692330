"""Search report on the reference model: each policy's plan at one budget next to FP32 and uniform INT8/INT4.

For every policy (uniform, greedy, ilp, rl) the plan found at ``--budget-frac`` × uniform INT8
weight MB is evaluated on held-out text (top-1, perplexity) with its exact weight MB and the
modelled latency/energy per decode step (analytic model, target preset constants). With
``--measure`` each plan is also compiled into a host bundle and its decode step timed here.
Prints a markdown table and checks the issue's target: the searched (rl) plan loses at most
1 % top-1 (relative) against FP32 with at least 40 % less weight memory than uniform INT8.

Usage::

    python benchmarks/search_report.py [--profile out/reference-profile.json] [--budget-frac 0.6] [--measure]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from search_common import Bench, ensure_profile, markdown  # noqa: E402

from moec.cli.search_cmd import parse_tensor_bits  # noqa: E402
from moec.search.cost import CostConfig  # noqa: E402
from moec.search.driver import SearchOptions, run_search  # noqa: E402
from moec.pipeline.search import uniform_memory_mb  # noqa: E402
from moec.search.policies import POLICIES  # noqa: E402
from moec.search.problem import DEFAULT_TENSORS, build_problem  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", type=Path, default=Path("out/reference-profile.json"))
    ap.add_argument("--budget-frac", type=float, default=0.6, help="Budget as a fraction of uniform INT8 MB.")
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--gamma", type=float, default=0.05)
    ap.add_argument("--weighting", default=None, help="Default: the search's default weighting.")
    ap.add_argument("--tensor-bits", default=None, help="Non-expert bits, e.g. 're:.*=8' [the search default].")
    ap.add_argument("--method", default="rtn", help="Quantizer of the searched plans (sensitivity is rtn).")
    ap.add_argument("--episodes", type=int, default=300)
    ap.add_argument("--heldout-tokens", type=int, default=16384)
    ap.add_argument("--measure", action="store_true", help="Compile host bundles and time decode steps.")
    args = ap.parse_args()

    bench = Bench(ensure_profile(args.profile), heldout_tokens=args.heldout_tokens)
    int8_mb = uniform_memory_mb(bench.model, 8)
    cost = CostConfig(args.alpha, args.beta, args.gamma, **({"weighting": args.weighting} if args.weighting else {}))
    prob = build_problem(bench.model.cfg, bench.stats, args.budget_frac * int8_mb, bench.preset.allowed_bits,
                         bench.norms, parse_tensor_bits(args.tensor_bits) or DEFAULT_TENSORS, method=args.method)
    fp32 = bench.evaluate("FP32", None)
    rows = [fp32, bench.evaluate("uniform INT8", "uniform:8"), bench.evaluate("uniform INT4", "uniform:4")]
    int8 = rows[1]
    found = {}
    for name in POLICIES:
        t0 = time.time()
        res = run_search(prob, cost, bench.estimator, SearchOptions(policy=name, episodes=args.episodes))
        counts = {b: int((prob.bits_of(res.assign) == b).sum()) for b in prob.bits}
        label = "/".join(f"{c}×{b}" for b, c in counts.items() if c)
        print(f"{name}: cost {res.cost.total:.4f}, {label} bits, {time.time() - t0:.1f} s", file=sys.stderr)
        found[name] = res
        rows.append(bench.evaluate(f"{name} ({label})", res.plan))
    if args.measure:
        for r in rows[1:]:
            r.measured_ms = bench.measure(r.plan)
    print(f"Reference model, budget {args.budget_frac:.0%} of uniform INT8 = {prob.budget_bytes / 1e6:.3f} MB; "
          f"non-expert weights {prob.tensors}; cost α={cost.alpha} β={cost.beta} "
          f"γ={cost.gamma}, weighting {cost.weighting}, {prob.loss_source}; latency/energy modelled "
          f"(analytic, {bench.preset.name} preset); held-out tokens {args.heldout_tokens}.\n")
    print(markdown(rows, fp32, int8))
    rl = rows[-1]
    drop = (fp32.top1 - rl.top1) / fp32.top1 * 100
    less = (1 - rl.mb / int8.mb) * 100
    ok = drop <= 1.0 and less >= 40.0
    print(f"\nrl plan: top-1 {drop:+.2f} % relative loss vs FP32 (target <= 1 %), {less:.1f} % less weight memory "
          f"than uniform INT8 (target >= 40 %): {'met' if ok else 'NOT met'}")
    if args.measure:
        faster = rl.measured_ms < int8.measured_ms
        print(f"measured decode: rl {rl.measured_ms:.3f} ms/step vs uniform INT8 {int8.measured_ms:.3f} ms/step: "
              f"{'faster' if faster else 'NOT faster'}")


if __name__ == "__main__":
    main()
