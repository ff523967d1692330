"""Accuracy/memory tables on a checkpoint: quantizer methods (RTN vs error-minimising) and static baselines.

Prints two markdown tables:

1. **Quantizers** — experts quantized at 2/3/4 bits with each method (rtn, mse, hqq, gptq),
   every other weight at 8-bit RTN, so the rows isolate the expert quantizer. ``gptq`` uses
   Hessians of the tokens each expert receives on the calibration text (``--calib``, by default
   ``calib.txt`` next to the held-out file); ``mse+act`` / ``hqq+act`` weight the error by the
   experts' mean x² on the same text; ``gptq-damp0.1``, ``gptq-mse`` and ``gptq-static`` are
   GPTQ variants (dampening 0.1, clipping search of the group params, static groups).
2. **Static baselines** — FP32 and uniform 8/4/3/2-bit plans (every weight at B bits except
   the router, which stays float): average bits, MB, perplexity, top-1.

Usage::

    python benchmarks/accuracy_tables.py reference/checkpoint reference/data/heldout.txt
    python benchmarks/accuracy_tables.py reference/checkpoint reference/data/heldout.txt \
        --methods rtn,mse+act,gptq,gptq-damp0.1,gptq-mse,gptq-static
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

from moec.models.checkpoint import load_checkpoint
from moec.models.tokenizer import load_tokenizer
from moec.profile.data import read_text, token_windows
from moec.profile.evaluate import evaluate_windows
from moec.quant.accounting import float32_memory, plan_memory
from moec.profile.importance import expert_hessians, expert_importance
from moec.quant.packed_model import fake_quantize_model
from moec.core.plan import BitPlan, uniform_plan


#: Quantizer-table rows: name -> (plan method, uses importance, gptq options).
METHODS: dict[str, tuple[str, bool, dict]] = {
    "rtn": ("rtn", False, {}),
    "mse": ("mse", False, {}),
    "hqq": ("hqq", False, {}),
    "mse+act": ("mse", True, {}),
    "hqq+act": ("hqq", True, {}),
    "gptq": ("gptq", False, {}),
    "gptq-damp0.1": ("gptq", False, {"damp": 0.1}),
    "gptq-mse": ("gptq", False, {"group_method": "mse"}),
    "gptq-static": ("gptq", False, {"static_groups": True}),
    "gptq-mse-damp0.1": ("gptq", False, {"group_method": "mse", "damp": 0.1}),
}


def _eval(model, plan, windows, importance=None, hessians=None, gptq_options=None):
    m = copy.deepcopy(model)
    if plan is not None:
        fake_quantize_model(m, plan, importance=importance, hessians=hessians, gptq_options=gptq_options)
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
    ap.add_argument("--methods", default="rtn,mse,hqq,gptq",
                    help=f"comma-separated quantizer rows; choices: {', '.join(METHODS)}")
    ap.add_argument("--calib", default=None,
                    help="calibration text for gptq Hessians / +act importance (default: calib.txt "
                         "next to the held-out file)")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    args = ap.parse_args()
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown method(s) {', '.join(unknown)}; choices: {', '.join(METHODS)}")
    model = load_checkpoint(args.checkpoint)
    tok = load_tokenizer(args.checkpoint)
    windows = token_windows(tok, read_text(args.data), args.seq_len, args.max_tokens)
    hessians = importance = None
    if any(METHODS[m][0] == "gptq" or METHODS[m][1] for m in methods):
        calib = Path(args.calib) if args.calib else Path(args.data).with_name("calib.txt")
        cwin = token_windows(tok, read_text(calib), args.seq_len, args.calib_tokens)
        if any(METHODS[m][0] == "gptq" for m in methods):
            hessians = expert_hessians(model, cwin)
        if any(METHODS[m][1] for m in methods):
            importance = expert_importance(model, cwin)
        print(f"calibration: {cwin[:, 1:].numel()} tokens of {calib}")
    t0 = time.time()
    fp = evaluate_windows(model, windows)
    print(f"{windows[:, 1:].numel()} held-out tokens; FP32 perplexity {fp.perplexity:.3f}, top-1 {fp.top1:.4f}\n")

    print("### Expert quantizer (experts at B bits, other weights 8-bit RTN, group "
          f"{args.group_size})\n")
    print("| expert bits | method | perplexity | top-1 | Δtop-1 vs FP32 |")
    print("|---|---|---|---|---|")
    for bits in (2, 3, 4):
        for method in methods:
            kind, act, opts = METHODS[method]
            plan = experts_only_plan(model.cfg, bits, kind, args.group_size)
            r = _eval(model, plan, windows, importance if act else None, hessians, opts)
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
