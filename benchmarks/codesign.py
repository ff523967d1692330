"""Co-design benchmark: post-training quantization vs quantization-aware fine-tuning (``moec finetune``).

On the reference model, two held-out domains (the Python-docs held-out split and Debian license
texts, ``reference/data/licenses.txt``), at uniform 2 and 3 bits, the searched plan at 60 % of
uniform INT8 bytes and N randomly shifted plans (every integer-width expert one width step up or
down from the searched plan): perplexity and top-1 of PTQ (the better of ``mse`` and ``gptq`` per
plan; the shifted plans use the method that won on the searched plan) against the fine-tuned
checkpoints. Fine-tuning runs as ``moec finetune`` subprocesses, whose time and peak memory are
printed; three fine-tunes: ``--plan uniform:2``, ``--plan uniform:3``, ``--plan searched --shift-robust``.

    python benchmarks/codesign.py [--steps 40] [--eval-tokens 4096] [--shifted 20] [--work out/codesign]

Every comparison is paired, token by token (``moec.profile.paired``): co-designed minus PTQ top-1 and NLL with a
95 % bootstrap interval over held-out windows, the counts of tokens only one of the two predicts, and the share
of PTQ's top-1 drop below FP32 recovered with its interval. ``--eval-tokens 0`` scores the whole of both files;
``--shift-stride k`` scores the shifted plans on every k-th window. Per-token scores are kept in ``--work/scores``
(keyed by model, plan, method and tokens), so a re-run or another ``--parts`` run scores nothing twice.

``--parts knobs`` measures the architecture knobs instead (no fine-tune): the searched plan with
router temperatures, with rarely-used experts dropped (by the profile's routing frequency) and with pairs
of them merged (frequency-weighted average; next to dropping the same absorbed experts),
perplexity and top-1 on both domains and bytes against the plan and uniform INT8.

    python benchmarks/codesign.py --parts knobs [--eval-tokens 4096] [--work out/codesign]

``--parts knobs --search-only`` measures the search choosing the knobs: ``moec search --policy ilp`` with and
without ``--knobs drop`` (profile with the width-0 "dropped" sensitivity) at each ``--knob-budgets`` fraction of
uniform INT8 bytes, perplexity and top-1 on both domains.

``--parts blockwise`` fine-tunes for uniform 2-bit twice, whole-model and ``--blockwise`` (same steps per
block as the whole model's, ``--train-tokens`` of calibration text for both), and prints time, peak RSS and
perplexity / top-1 against PTQ (``mse``) on both domains.

``--parts shifted`` runs only the fine-tune around the searched plan (``--weighted-shift``: widths
weighted by routing frequency, ``moec finetune --profile``) and compares it with PTQ (``mse``) on
the searched plan and the shifted plans.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from moec import api
from moec.core.plan import BitPlan, resolve_plan
from moec.finetune.bit_sampler import shifted_plan
from moec.models.checkpoint import load_checkpoint
from moec.models.tokenizer import load_tokenizer
from moec.profile.data import file_windows
from moec.profile.evaluate import EvalResult, TokenScores, evaluate_windows, score_tokens
from moec.profile.paired import Paired, paired
from moec.profile.importance import expert_hessians
from moec.quant.accounting import plan_memory
from moec.quant.packed_model import fake_quantize_model
from moec.profile.stats import ExpertStats
from moec.search.knobs import rare_experts, rare_pairs, with_knobs

REPO = Path(__file__).resolve().parents[1]
CKPT = REPO / "reference" / "checkpoint"
CALIB = REPO / "reference" / "data" / "calib.txt"
DOMAINS = {"python-docs": REPO / "reference" / "data" / "heldout.txt",
           "licenses": REPO / "reference" / "data" / "licenses.txt"}


def searched_plan(work: Path, calib_tokens: int) -> BitPlan:
    """ILP plan at 60 % of uniform INT8 bytes on the proxy sensitivity (cached in ``work``)."""
    path = work / "searched-plan.json"
    if path.is_file():
        return BitPlan.load(path)
    prof = work / "profile.json"
    if not prof.is_file():
        api.profile(CKPT, api.DataConfig(CALIB, 256, calib_tokens, 8), out=prof, progress=False,
                    sensitivity=api.SensitivityConfig("proxy", (2, 3, 4, 8), 64, "rtn"))
    plan = api.search(api.SearchConfig(CKPT, "host", profile=prof, policy="ilp", progress=False)).result.plan
    plan.save(path)
    return plan


def run_finetune(work: Path, name: str, plan: str, args, extra: list[str]) -> dict:
    out = work / f"ft-{name}"
    if args.reuse and (out / "finetune.json").is_file():
        res = json.loads((out / "finetune.json").read_text())["result"]
        kl = f"{res['first_loss']:.4f} -> {res['last_loss']:.4f}"
        print(f"finetune {name} (reused {out}, {' '.join(extra)}): {res['steps']} steps, {res['seconds']:.0f} s training, "
              f"peak RSS {res['peak_rss_mb']:.0f} MB, KL {kl}", flush=True)
        return {"name": name, "seconds": res["seconds"], "cpu": res.get("cpu_seconds", 0.0), "peak_mb": res["peak_rss_mb"],
                "kl": kl}
    cmd = [sys.executable, "-m", "moec", "finetune", str(CKPT), "--data", str(CALIB), "--plan", plan,
           "--out", str(out), "--steps", str(args.steps), "--batch", str(args.batch), "--lr", str(args.lr),
           "--scale-lr", str(args.scale_lr), "--force", *extra]
    t0 = time.perf_counter()
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"finetune {name} failed: {proc.stderr.strip()[-400:]}")
    txt = proc.stdout
    m = re.search(r"time\s+([\d.]+) s \(CPU ([\d.]+) s\)", txt)
    secs, cpu = float(m.group(1)), float(m.group(2))
    peak = float(re.search(r"peak memory\s+([\d.]+) MB", txt).group(1))
    kl = re.search(r"(?:KL|rel\. error)\s+(.*)", txt).group(1)
    steps = re.search(r"steps\s+(\d+)", txt).group(1)
    print(f"finetune {name}: {steps} steps, {secs:.0f} s training ({wall:.0f} s with loading), "
          f"peak RSS {peak:.0f} MB, KL {kl}", flush=True)
    return {"name": name, "seconds": secs, "cpu": cpu, "peak_mb": peak, "kl": kl}


def evaluate(model, plan: BitPlan, windows: dict, hessians=None) -> dict:
    m = fake_quantize_model(copy.deepcopy(model), plan, hessians=hessians)
    return {d: evaluate_windows(m, w, batch=8) for d, w in windows.items()}


def eval_windows(tok, args, stride: int = 1) -> dict:
    """Held-out windows per domain: the first ``--eval-tokens`` (0: the whole file), every ``stride``-th window."""
    return {d: file_windows(tok, p, 256, args.eval_tokens or None)[0][::stride] for d, p in DOMAINS.items()}


def plan_key(plan: BitPlan) -> dict:
    return {"experts": plan.experts, "tensors": plan.tensors, "group": plan.group_size}


def scores(args, model, model_key: str, plan: BitPlan | None, method: str, windows: dict, stride: int,
           hessians=None) -> dict[str, TokenScores]:
    """Per-token scores of ``model`` quantized by ``plan`` with ``method`` (``plan`` None: the float model) on
    ``windows``; kept in ``--work/scores/`` under a hash of (model, plan, method, tokens), so a re-run or a
    second part scores each (model, plan) once."""
    key = json.dumps({"model": model_key, "plan": plan_key(plan) if plan else None, "method": method,
                      "tokens": args.eval_tokens, "stride": stride, "domains": sorted(windows)}, sort_keys=True)
    path = args.work / "scores" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.pt"
    if path.is_file():
        return {d: TokenScores(*v) for d, v in torch.load(path).items()}
    if plan is None:
        m = model
    else:
        pm = plan.copy()
        pm.method = method
        m = fake_quantize_model(copy.deepcopy(model), pm, hessians=hessians)
    out = {d: score_tokens(m, w, batch=8) for d, w in windows.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({d: (r.nll, r.correct) for d, r in out.items()}, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    return out


def tuned_key(work: Path, name: str) -> str:
    """Identifies a fine-tuned checkpoint by its name and recorded settings / result (a re-run changes it)."""
    return f"ft-{name}:" + hashlib.sha256((work / f"ft-{name}" / "finetune.json").read_bytes()).hexdigest()[:16]


def stack(rs: list[dict[str, TokenScores]], d: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Correctness and NLL of domain ``d`` over several plans, ``[plans, windows, tokens]``."""
    return torch.stack([r[d].correct for r in rs]), torch.stack([r[d].nll for r in rs])


def compare(ptq: list[dict], co: list[dict], fp32: dict, d: str, stride: int = 1) -> Paired:
    """Co-designed against PTQ on domain ``d``: paired over the same windows (and plans), with the share of
    PTQ's top-1 drop below FP32 recovered (FP32 is scored on every window, the plans on every ``stride``-th)."""
    (pc, pn), (cc, cn) = stack(ptq, d), stack(co, d)
    return paired(pc, cc, pn, cn, ref_correct=fp32[d].correct[::stride], samples=2000)


def fmt_paired(c: Paired) -> str:
    """``Δtop-1 [95 %] | tokens co-only / PTQ-only | ΔNLL [95 %] | recovered [95 %]`` cells."""
    rec = (f"{c.recovered:.0%} [{c.recovered_lo:.0%}, {c.recovered_hi:.0%}]" if c.recovered == c.recovered
           and c.recovered_lo == c.recovered_lo else (f"{c.recovered:.0%}" if c.recovered == c.recovered else "–"))
    return (f"{100 * c.top1_diff:+.2f} [{100 * c.top1_lo:+.2f}, {100 * c.top1_hi:+.2f}] | "
            f"{c.b_only:.0f} / {c.a_only:.0f} | {c.nll_diff:+.4f} [{c.nll_lo:+.4f}, {c.nll_hi:+.4f}] | {rec}")


def fp32_top1(fp32: dict[str, TokenScores], d: str, stride: int) -> float:
    """FP32 top-1 on the windows a row is scored on (every ``stride``-th)."""
    return float(fp32[d].correct[::stride].double().mean())


def r(s: dict[str, TokenScores] | list[dict[str, TokenScores]], d: str) -> EvalResult:
    """Summary of one plan's scores, or the mean over several plans' (perplexity of the mean NLL)."""
    rs = s if isinstance(s, list) else [s]
    res = [x[d].result() for x in rs]
    nll = sum(x.nll for x in res) / len(res)
    return EvalResult(math.exp(nll), sum(x.top1 for x in res) / len(res), nll, res[0].tokens)


def searched_knobs(args) -> None:
    """The search choosing drops (``--knobs drop``) against the search without it, at the same budgets."""
    t0 = time.perf_counter()
    searched_plan(args.work, args.calib_tokens)  # the bits-only profile, cached
    prof = args.work / "profile-drop.json"
    if not prof.is_file():
        api.profile(CKPT, api.DataConfig(CALIB, 256, args.calib_tokens, 8), out=prof, progress=False,
                    sensitivity=api.SensitivityConfig("proxy", (0, 2, 3, 4, 8), 64, "rtn"))
    ref = load_checkpoint(CKPT)
    int8 = plan_memory(ref, resolve_plan("uniform:8", ref.cfg)).total
    tok = load_tokenizer(CKPT)
    windows = eval_windows(tok, args)
    print("\n| budget (of INT8) | search | dropped | expert bits | " + " | ".join(f"{d} ppl | {d} top-1" for d in windows)
          + " | bytes vs INT8 |")
    print("|---|---|---|---|" + "---|---|" * len(windows) + "---|")
    for frac in args.knob_budgets:
        for knobs in ((), ("drop",)):
            plan = api.search(api.SearchConfig(CKPT, "host", budget_mb=frac * int8 / 1e6, profile=prof, policy="ilp",
                                               progress=False, knobs=knobs)).result.plan
            plan.save(args.work / f"searched-{frac}-{'drop' if knobs else 'bits'}.json")
            r = evaluate(ref, plan, windows)
            drops = {l: ex for l, ex in plan.dropped_experts.items() if ex}
            bits = sorted(b for l, ex in plan.experts.items() for e, b in ex.items() if not plan.is_dropped(l, e))
            hist = ", ".join(f"{bits.count(b)}x{b}" for b in sorted(set(bits)))
            print(f"| {frac:.0%} | {'bits + drop' if knobs else 'bits only'} | "
                  f"{sum(map(len, drops.values()))} {json.dumps({str(k): v for k, v in drops.items()}) if drops else ''} | "
                  f"{hist} | " + " | ".join(f"{r[d].perplexity:.2f} | {r[d].top1:.4f}" for d in windows)
                  + f" | {plan_memory(ref, plan).total / int8:.1%} |", flush=True)
    print(f"\nsearch-knobs benchmark wall {time.perf_counter() - t0:.0f} s ({args.eval_tokens} tokens per domain)")


def knobs(args) -> None:
    """Router temperature and expert dropping on the searched plan: accuracy and bytes, no fine-tune."""
    if args.search_only:
        return searched_knobs(args)
    t0 = time.perf_counter()
    plan = searched_plan(args.work, args.calib_tokens)
    stats = ExpertStats.load(args.work / "profile.json")
    ref = load_checkpoint(CKPT)
    int8 = plan_memory(ref, resolve_plan("uniform:8", ref.cfg)).total
    tok = load_tokenizer(CKPT)
    windows = eval_windows(tok, args)
    for layer in sorted(stats.layers):
        f = stats.frequency(layer)
        print(f"layer {layer} routing frequency (share of {stats.tokens} calibration tokens): "
              + " ".join(f"{x:.3f}" for x in f), flush=True)
    cases = [("searched plan", plan)]
    cases += [(f"router temperature {t}", with_knobs(plan, router_temperature=t)) for t in args.temperatures]
    for thr in args.drop_frequencies:
        d = rare_experts(stats, thr)
        label = "drop never-used experts" if thr == 0 else f"drop experts with frequency <= {thr}"
        cases.append((f"{label} ({sum(map(len, d.values()))})", with_knobs(plan, dropped=d)))
    for k in (1, 2):
        d = rare_experts(stats, 1.0, per_layer=k)
        cases.append((f"drop {k} rarest per layer ({sum(map(len, d.values()))})", with_knobs(plan, dropped=d)))
    # merging: pairs of rare experts, frequency-weighted average; against dropping the same absorbed experts
    for thr, per_layer in [(t, None) for t in args.drop_frequencies if t > 0] + [(1.0, 1)]:
        m = rare_pairs(stats, thr, per_layer)
        what = f"frequency <= {thr}" if per_layer is None else "the 2 rarest per layer"
        n = sum(map(len, m.values()))
        if not n:
            continue
        cases.append((f"merge pairs of {what} ({n} pairs)", with_knobs(plan, merged=m)))
        absorbed = {l: [b for _, b, _ in pairs] for l, pairs in m.items()}
        cases.append((f"drop the absorbed expert of each pair instead ({n})", with_knobs(plan, dropped=absorbed)))
    base_bytes = plan_memory(ref, plan).total
    print("\n| plan | " + " | ".join(f"{d} ppl | {d} top-1" for d in windows) + " | bytes vs plan | vs INT8 |")
    print("|---|" + "---|---|" * len(windows) + "---|---|")
    for label, p in cases:
        p.validate(ref.cfg)
        r = evaluate(ref, p, windows)
        b = plan_memory(ref, p).total
        print(f"| {label} | " + " | ".join(f"{r[d].perplexity:.2f} | {r[d].top1:.4f}" for d in windows)
              + f" | {b / base_bytes:.1%} | {b / int8:.1%} |", flush=True)
    print(f"\nknobs benchmark wall {time.perf_counter() - t0:.0f} s ({args.eval_tokens} tokens per domain)")


def plan_finetune_args(args) -> tuple[str, list[str]]:
    """Name and extra ``moec finetune`` options of the fine-tune around the searched plan."""
    name = args.ft_name or ("plan-weighted" if args.weighted_shift else "plan")
    extra = ["--shift-robust", "--shift-prob", str(args.shift_prob), "--plan-prob", str(args.plan_prob),
             "--seed", str(args.ft_seed)]
    if args.plan_weight:
        extra += ["--plan-weight", str(args.plan_weight)]
    if args.plan_lr is not None:
        extra += ["--lr", str(args.plan_lr)]  # after run_finetune's --lr: click keeps the last
    if args.plan_steps:
        extra += ["--steps", str(args.plan_steps)]  # after run_finetune's --steps: click keeps the last
    if args.weighted_shift:
        extra += ["--profile", str(args.work / "profile.json")]
    return name, extra


def shifted_only(args) -> None:
    """Only the fine-tune around the searched plan and the shifted plans: PTQ (``mse``) vs co-designed."""
    plan = searched_plan(args.work, args.calib_tokens)
    pft, extra = plan_finetune_args(args)
    ft = run_finetune(args.work, pft, str(args.work / "searched-plan.json"), args, extra)
    ref, tuned = load_checkpoint(CKPT), load_checkpoint(args.work / f"ft-{pft}")
    tkey = tuned_key(args.work, pft)
    tok = load_tokenizer(CKPT)
    windows, sw = eval_windows(tok, args), eval_windows(tok, args, args.shift_stride)
    fp32 = scores(args, ref, "ref", None, "", windows, 1)
    groups = [("searched plan", [plan], windows, 1)]
    for seed in args.shift_seeds:
        rng = random.Random(seed)
        groups.append((f"{args.shifted} shifted plans (mean, seed {seed})",
                       [shifted_plan(plan, rng) for _ in range(args.shifted)], sw, args.shift_stride))
    print(f"\n{pft} ({' '.join(extra)}): {ft['seconds']:.0f} s, peak {ft['peak_mb']:.0f} MB, KL {ft['kl']}")
    print("| plans | domain | scored tokens | FP32 top-1 | PTQ (mse) ppl / top-1 | co-designed ppl / top-1 | "
          "Δtop-1 co − PTQ, pt [95 %] | tokens co-only / PTQ-only | ΔNLL [95 %] | drop recovered [95 %] |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, plans, w, stride in groups:
        ptq = [scores(args, ref, "ref", p, "mse", w, stride) for p in plans]
        co = [scores(args, tuned, tkey, p, "mse", w, stride) for p in plans]
        for d in w:
            c, pr, cr = compare(ptq, co, fp32, d, stride), r(ptq, d), r(co, d)
            print(f"| {label} | {d} | {c.tokens} | {fp32_top1(fp32, d, stride):.4f} | {pr.perplexity:.2f} / {pr.top1:.4f} | "
                  f"{cr.perplexity:.2f} / {cr.top1:.4f} | {fmt_paired(c)} |", flush=True)


def blockwise(args) -> None:
    """Whole-model vs block-wise fine-tuning for uniform 2-bit: time, peak RSS and top-1 recovery (PTQ ``mse``)."""
    extra = ["--max-tokens", str(args.train_tokens)] if args.train_tokens else []
    fts = [run_finetune(args.work, "u2-blockwise", "uniform:2", args, extra + ["--blockwise"]),
           run_finetune(args.work, "u2", "uniform:2", args, extra)][::-1]
    ref = load_checkpoint(CKPT)
    tok = load_tokenizer(CKPT)
    windows = eval_windows(tok, args)
    fp32 = {d: evaluate_windows(ref, w, batch=8) for d, w in windows.items()}
    plan = resolve_plan("uniform:2", ref.cfg)
    rows = [("PTQ (mse)", evaluate(ref, plan, windows), None)]
    for ft, label in zip(fts, ("whole-model fine-tune (KL)", "block-wise fine-tune (MSE per layer, KL head)")):
        rows.append((label, evaluate(load_checkpoint(args.work / f"ft-{ft['name']}"), plan, windows), ft))
    print("\nFP32: " + "; ".join(f"{d} top-1 {r.top1:.4f} ppl {r.perplexity:.3f} ({r.tokens} tokens)"
                                  for d, r in fp32.items()))
    print("\n| uniform 2-bit | " + " | ".join(f"{d} ppl | {d} top-1 (recovered)" for d in windows)
          + " | fine-tune wall / CPU | peak RSS |")
    print("|---|" + "---|---|" * len(windows) + "---|---|")
    for label, r, ft in rows:
        cells = []
        for d in windows:
            dp, dc = fp32[d].top1 - rows[0][1][d].top1, fp32[d].top1 - r[d].top1
            rec = f" ({(dp - dc) / dp:.0%})" if ft is not None and dp > 5e-4 else ""
            cells.append(f"{r[d].perplexity:.2f} | {r[d].top1:.4f}{rec}")
        cost = f"{ft['seconds']:.0f} s / {ft['cpu']:.0f} s | {ft['peak_mb']:.0f} MB" if ft else "– | –"
        print(f"| {label} | " + " | ".join(cells) + f" | {cost} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40, help="fine-tuning steps of each of the three fine-tunes")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--scale-lr", type=float, default=2e-3)
    ap.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens per domain (0: the whole file)")
    ap.add_argument("--shift-stride", type=int, default=1,
                    help="the shifted plans are scored on every k-th held-out window (1: all)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch / OpenMP threads of the benchmark and its fine-tunes (0: torch's default; on a loaded "
                         "shared machine 1 is many times faster than 2)")
    ap.add_argument("--calib-tokens", type=int, default=8192, help="profile / GPTQ Hessian tokens")
    ap.add_argument("--shifted", type=int, default=20)
    ap.add_argument("--work", type=Path, default=REPO / "out" / "codesign")
    ap.add_argument("--reuse", action="store_true", help="reuse fine-tuned checkpoints already in --work")
    ap.add_argument("--train-tokens", type=int, default=0,
                    help="--parts blockwise: calibration tokens both fine-tunes read (0: all)")
    ap.add_argument("--parts", choices=("finetune", "knobs", "shifted", "blockwise"), default="finetune",
                    help="finetune: the full table; knobs: architecture knobs (no fine-tune); shifted: only the "
                         "fine-tune around the searched plan, on the searched and shifted plans")
    ap.add_argument("--weighted-shift", action="store_true",
                    help="shift-robust fine-tune with widths weighted by routing frequency (finetune --profile)")
    ap.add_argument("--shift-prob", type=float, default=0.5,
                    help="the searched-plan fine-tune's --shift-prob (1: every expert shifted in a shifted step)")
    ap.add_argument("--plan-prob", type=float, default=0.0,
                    help="the searched-plan fine-tune's --plan-prob (share of steps on the plan itself)")
    ap.add_argument("--plan-weight", type=float, default=0.0,
                    help="the searched-plan fine-tune's --plan-weight (the plan's own KL added every step)")
    ap.add_argument("--plan-lr", type=float, default=None,
                    help="the searched-plan fine-tune's float-weight --lr (default: --lr; 0: float weights frozen, "
                         "only the per-width scales and zeros learn)")
    ap.add_argument("--plan-steps", type=int, default=0,
                    help="steps of the searched-plan fine-tune (0: --steps)")
    ap.add_argument("--ft-seed", type=int, default=0, help="the searched-plan fine-tune's --seed")
    ap.add_argument("--ft-name", default="", help="directory name (ft-NAME) of the searched-plan fine-tune")
    ap.add_argument("--shift-seeds", type=int, nargs="+", default=[0],
                    help="seeds of the shifted plans (--shifted plans per seed, each group reported)")
    ap.add_argument("--search-only", action="store_true",
                    help="--parts knobs: only the search with --knobs drop against the search without it")
    ap.add_argument("--knob-budgets", type=float, nargs="+", default=[0.5, 0.55, 0.6],
                    help="--parts knobs --search-only: budgets as fractions of uniform INT8 bytes")
    ap.add_argument("--temperatures", type=float, nargs="*", default=[0.7, 0.85, 1.2, 1.5])
    ap.add_argument("--drop-frequencies", type=float, nargs="+", default=[0.0, 0.05, 0.1])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.parts == "knobs":
        return knobs(args)
    if args.parts == "shifted":
        return shifted_only(args)
    if args.parts == "blockwise":
        return blockwise(args)
    t_start = time.perf_counter()

    plan = searched_plan(args.work, args.calib_tokens)
    plan_file = args.work / "searched-plan.json"
    ref = load_checkpoint(CKPT)
    int8 = plan_memory(ref, resolve_plan("uniform:8", ref.cfg)).total
    print(f"searched plan (ilp, proxy sensitivity): {plan_memory(ref, plan).total / int8:.1%} of uniform INT8 bytes, "
          f"expert bits {sorted(b for ex in plan.experts.values() for b in ex.values())}", flush=True)

    pft, extra = plan_finetune_args(args)  # fine-tuned around the searched plan
    fts = [run_finetune(args.work, "u2", "uniform:2", args, []),
           run_finetune(args.work, "u3", "uniform:3", args, []),
           run_finetune(args.work, pft, str(plan_file), args, extra)]

    tok = load_tokenizer(CKPT)
    windows, sw = eval_windows(tok, args), eval_windows(tok, args, args.shift_stride)
    calib = file_windows(tok, CALIB, 256, args.calib_tokens)[0]
    hessians = expert_hessians(ref, calib)
    fp32 = scores(args, ref, "ref", None, "", windows, 1)
    tuned = {n: load_checkpoint(args.work / f"ft-{n}") for n in ("u2", "u3", pft)}
    tkeys = {n: tuned_key(args.work, n) for n in tuned}

    rows, best_method = [], "mse"
    for label, p, ft in [("uniform 2-bit", resolve_plan("uniform:2", ref.cfg), "u2"),
                         ("uniform 3-bit", resolve_plan("uniform:3", ref.cfg), "u3"), ("searched plan", plan, pft)]:
        ptq = {m: scores(args, ref, "ref", p, m, windows, 1, hessians if m == "gptq" else None) for m in ("mse", "gptq")}
        method = max(ptq, key=lambda k: sum(x.result().top1 for x in ptq[k].values()))
        if label == "searched plan":
            best_method = method
        co = scores(args, tuned[ft], tkeys[ft], p, "mse", windows, 1)
        rows.append((label, method, [ptq[method]], [co], windows, 1))
        print(f"  {label}: " + "; ".join(f"{d} PTQ {r(ptq[method], d).top1:.4f} co {r(co, d).top1:.4f}" for d in windows),
              flush=True)
    for seed in args.shift_seeds:
        rng = random.Random(seed)
        plans = [shifted_plan(plan, rng) for _ in range(args.shifted)]
        h = hessians if best_method == "gptq" else None
        ptq = [scores(args, ref, "ref", p, best_method, sw, args.shift_stride, h) for p in plans]
        co = [scores(args, tuned[pft], tkeys[pft], p, "mse", sw, args.shift_stride) for p in plans]
        rows.append((f"{args.shifted} shifted plans (mean, seed {seed})", best_method, ptq, co, sw, args.shift_stride))
        print(f"  shifted plans, seed {seed}: done", flush=True)

    print(f"\nFP32: " + "; ".join(f"{d} top-1 {x.result().top1:.4f} ppl {x.result().perplexity:.3f} "
                                  f"({x.result().tokens} tokens)" for d, x in fp32.items()))
    print("\n| plan | domain | scored tokens | FP32 top-1 | PTQ method | PTQ ppl | PTQ top-1 | co-designed ppl | co-designed top-1 | "
          "Δtop-1 co − PTQ, pt [95 %] | tokens co-only / PTQ-only | ΔNLL co − PTQ [95 %] | drop recovered [95 %] |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, method, ptq, co, w, stride in rows:
        for d in w:
            c, pr, cr = compare(ptq, co, fp32, d, stride), r(ptq, d), r(co, d)
            print(f"| {label} | {d} | {c.tokens} | {fp32_top1(fp32, d, stride):.4f} | {method} | {pr.perplexity:.2f} | {pr.top1:.4f} | {cr.perplexity:.2f} | "
                  f"{cr.top1:.4f} | {fmt_paired(c)} |")
        if len(ptq) > 1:
            for d in w:
                better = sum(float(x[d].correct.float().mean()) >= float(y[d].correct.float().mean())
                             for x, y in zip(co, ptq))
                print(f"|  | {d} | co-designed top-1 ≥ PTQ on {better} of {len(ptq)} shifted plans | | | | | | | | | | |")
    total = sum(f["seconds"] for f in fts)
    print(f"\nfine-tuning: " + ", ".join(f"{f['name']} {f['seconds']:.0f} s (CPU {f['cpu']:.0f} s) / peak {f['peak_mb']:.0f} MB"
                                      for f in fts)
          + f"; total {total:.0f} s ({total / 60:.1f} min); benchmark wall {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
