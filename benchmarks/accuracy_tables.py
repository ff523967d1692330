"""Accuracy/memory tables on a checkpoint: quantizer methods (RTN vs error-minimising) and static baselines.

Prints two markdown tables:

1. **Quantizers** — experts quantized at 2/3/4 bits with each method (rtn, mse, hqq), every
   other weight at 8-bit RTN, so the rows isolate the expert quantizer.
2. **Static baselines** — FP32 and uniform 8/4/3/2-bit plans (every weight at B bits except
   the router, which stays float): average bits, MB, perplexity, top-1.

Usage::

    python benchmarks/accuracy_tables.py reference/checkpoint reference/data/heldout.txt
"""

from __future__ import annotations

import argparse
import copy
import time

from moec.models.checkpoint import load_checkpoint
from moec.models.tokenizer import load_tokenizer
from moec.profile.data import read_text, token_windows
from moec.profile.evaluate import evaluate_windows
from moec.quant.accounting import float32_memory, plan_memory
from moec.quant.packed_model import apply_plan
from moec.search.plan import BitPlan, uniform_plan


def _eval(model, plan, windows):
    m = copy.deepcopy(model)
    if plan is not None:
        apply_plan(m, plan)
    return evaluate_windows(m, windows)


def experts_only_plan(cfg, bits: int, method: str, group: int) -> BitPlan:
    experts = {l: {e: bits for e in range(cfg.num_experts)} for l in cfg.moe_layers}
    return BitPlan(experts, {"router": 16, "re:.*": 8}, group, method, cfg.fingerprint(),
                   {"policy": f"experts-{bits}-{method}"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("data")
    ap.add_argument("--max-tokens", type=int, default=32768)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--methods", default="rtn,mse,hqq")
    args = ap.parse_args()
    model = load_checkpoint(args.checkpoint)
    windows = token_windows(load_tokenizer(args.checkpoint), read_text(args.data), args.seq_len, args.max_tokens)
    t0 = time.time()
    fp = evaluate_windows(model, windows)
    print(f"{windows[:, 1:].numel()} held-out tokens; FP32 perplexity {fp.perplexity:.3f}, top-1 {fp.top1:.4f}\n")

    print("### Expert quantizer (experts at B bits, other weights 8-bit RTN, group "
          f"{args.group_size})\n")
    print("| expert bits | method | perplexity | top-1 | Δtop-1 vs FP32 |")
    print("|---|---|---|---|---|")
    for bits in (2, 3, 4):
        for method in args.methods.split(","):
            r = _eval(model, experts_only_plan(model.cfg, bits, method, args.group_size), windows)
            print(f"| {bits} | {method} | {r.perplexity:.3f} | {r.top1:.4f} | {100 * (r.top1 - fp.top1):+.2f} pt |")

    print(f"\n### Static (uniform) baselines, RTN, group {args.group_size}\n")
    print("| plan | avg bits | weight MB | perplexity | top-1 |")
    print("|---|---|---|---|---|")
    print(f"| FP32 | 32 | {float32_memory(model) / 1e6:.2f} | {fp.perplexity:.3f} | {fp.top1:.4f} |")
    for bits in (8, 4, 3, 2):
        plan = uniform_plan(model.cfg, bits, args.group_size)
        mem = plan_memory(model, plan)
        r = _eval(model, plan, windows)
        avg = 8 * mem.total / sum(p.numel() for p in model.parameters())
        print(f"| uniform INT{bits} | {avg:.2f} | {mem.megabytes:.2f} | {r.perplexity:.3f} | {r.top1:.4f} |")
    print(f"\n(avg bits = stored bits per parameter incl. scales, zeros and float norms; {time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
