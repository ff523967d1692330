"""Latency simulator vs. real decode-step measurements of held-out mixed plans, on a farm.

Calibrates :class:`moec.hardware.simulator.LatencySimulator` on a farm (a local one on this
host unless ``--tracker`` is given): GEMV tables per bit class and shape, and the fitted
base/per-class overheads from calibration bundles. Then builds held-out plans (random
per-expert bits; some with other attention/lm_head bits), measures their decode steps on the
same token stream (the reference data's first tokens), and prints predicted vs measured with
the median relative error. Everything measured goes through the measurement store, so a
second run reuses it.

Usage: ``python benchmarks/simulator_error.py [--checkpoint reference/checkpoint] [--plans 6]``
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from moec.hardware.simulator_fit import build_bundles, routing_frequencies
from moec.hardware.farm import LocalFarm
from moec.hardware.candidates import BundleCandidate, Protocol
from moec.hardware.device_timing import measure_rounds
from moec.hardware.simulator import LatencySimulator, relative_error
from moec.hardware.store import MeasurementStore
from moec.models.checkpoint import load_config
from moec.models.tokenizer import load_tokenizer
from moec.core.plan import BitPlan, uniform_plan

REPO = Path(__file__).resolve().parents[1]


def heldout_plans(cfg, n: int, group_size: int, bits: tuple[int, ...], seed: int = 11) -> list[BitPlan]:
    """Random per-expert bits; every third plan also changes the attention / lm_head bits."""
    rng = np.random.default_rng(seed)
    plans = []
    for i in range(n):
        p = uniform_plan(cfg, 4, group_size)
        p.experts = {l: {e: int(rng.choice(bits)) for e in range(cfg.num_experts)} for l in cfg.moe_layers}
        if i % 3 == 2:
            p.tensors = {"router": 16, "attention": 8, "lm_head": 8, "re:.*": 4}
        p.provenance = {"policy": f"heldout-{i}"}
        plans.append(p)
    return plans


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=str(REPO / "reference" / "checkpoint"))
    ap.add_argument("--data", default=str(REPO / "reference" / "data" / "heldout.txt"))
    ap.add_argument("--workdir", default=str(REPO / "out" / "simulator-bench"))
    ap.add_argument("--tracker", default=None, help="HOST:PORT of an existing farm (default: start one)")
    ap.add_argument("--key", default="host")
    ap.add_argument("--target", default="host")
    ap.add_argument("--threads", type=int, default=1, help="TVM threads of the local farm's server")
    ap.add_argument("--plans", type=int, default=6)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved measurement rounds (fastest kept)")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--statistic", default="best", choices=["best", "median"],
                    help="measurement statistic fitted and compared (best: fastest repeats)")
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    for noisy in ("moec.export", "moec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("moec.farm").setLevel(logging.INFO)

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    store = MeasurementStore(work / "measurements.db")
    cfg = load_config(args.checkpoint)
    tok = load_tokenizer(args.checkpoint)
    stream = tok.encode(Path(args.data).read_text()[:4000]).ids[:args.steps]
    bits = (2, 3, 4, 8, 16)
    farm = None
    t0 = time.time()
    try:
        tracker = args.tracker
        if tracker is None:
            farm = LocalFarm(servers=1, key=args.key, threads=args.threads)
            tracker = farm.start()
        sim = LatencySimulator.calibrate(tracker, args.key, cfg, checkpoint=args.checkpoint, store=store,
                                         target=args.target, bits=bits, group_size=args.group_size,
                                         tokens=stream, repeats=args.repeats, workdir=work / "bundles",
                                         statistic=args.statistic, rounds=args.rounds, progress=True)
        sim.save(work / "simulator.json")
        plans = heldout_plans(cfg, args.plans, args.group_size, bits)
        bundles = build_bundles(args.checkpoint, plans, work / "bundles", args.target, progress=True)
        measured = measure_rounds(tracker, args.key, [BundleCandidate(b, stream) for b in bundles], store,
                                  Protocol(1, 5 * args.repeats, len(stream)), args.rounds, progress=True)
    finally:
        if farm is not None:
            farm.stop()
    rows = []
    print(f"\nsimulator: base {sim.base_s * 1e3:.4f} ms, per class {sim.per_class_s * 1e3:.4f} ms; "
          f"calibration measured {[round(x * 1e3, 4) for x in sim.calibration['measured_s']]} ms, "
          f"fitted {[round(x * 1e3, 4) for x in sim.calibration['fitted_s']]} ms")
    print(f"{'plan':<12} {'avg bits':>8} {'classes':>7} {'median ms':>9} {'IQR ms':>7} {'best ms':>8} "
          f"{'predicted ms':>12} {'rel err':>7}")
    for plan, ms in zip(plans, measured):
        m = min(ms, key=lambda x: getattr(x, f"{args.statistic}_s"))  # the least disturbed round
        freq = routing_frequencies(args.checkpoint, plan, stream)
        parts = sim.breakdown(cfg, plan, freq)
        target = getattr(m, f"{args.statistic}_s")
        err = relative_error(parts["total"], target)
        rows.append({"plan": plan.provenance["policy"], "median_s": m.median_s, "iqr_s": m.spread_s,
                     "best_s": m.best_s, "compared_to": args.statistic, "predicted_s": parts["total"],
                     "rel_error": err, "breakdown": parts, "avg_bits": plan.average_expert_bits()})
        print(f"{plan.provenance['policy']:<12} {plan.average_expert_bits():>8.2f} {parts['classes']:>7} "
              f"{m.median_s * 1e3:>9.4f} {m.spread_s * 1e3:>7.4f} {m.best_s * 1e3:>8.4f} "
              f"{parts['total'] * 1e3:>12.4f} {err:>7.1%}")
    med = float(np.median([r["rel_error"] for r in rows]))
    print(f"\nmedian relative error ({args.statistic} time) over {len(rows)} held-out plans: {med:.1%} "
          f"(goal <= 10%); "
          f"{time.time() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"median_rel_error": med, "rows": rows,
                                               "simulator": sim.to_json()}, indent=2, default=float))


if __name__ == "__main__":
    main()
