"""Size–perplexity frontier of moec against llama.cpp (Q2_K … Q8_0) on the same tokens and positions.

For every llama.cpp type: its tensor bytes and perplexity (``llama-perplexity -c CTX -b CTX``) next
to the best moec plan with no more bytes, scored by moec on llama.cpp's own token ids, chunks and
positions (``peer_common.py``), and whether moec dominates (no more bytes, no higher perplexity).

moec plans are built from five parts — routed experts, attention q/k/o, attention v, token embeddings,
LM head — each
at 2/3/4/8 bits (formats every backend has kernels for; the LM head also at 6 bits and the
experts also at 5, which have kernels on x86 and ARM), one group size and scale format per plan
(``--groups``: ``32`` = group 32 with fp16 scales, ``32u8`` = group 32 with double-quantized
scales, ``moec.core.formats.SCALE_FORMATS``), router float, quantizer ``--method`` (the default:
``mse``, as ``uniform:B``). The search:

1. sensitivity: each part alone at each width (the rest float) on the first ``--search-chunks``
   chunks: its perplexity increase over FP32 on those chunks;
2. for each llama.cpp point, every combination of part widths and group sizes whose exact bytes
   (``plan_memory``) fit is ranked by the summed increase (additive model); the ``--top`` best are
   scored on all chunks, with the fitting combination that spends the most bytes, the one with
   the widest experts (the best ranked of those) and the widest uniform one that fits (the additive
   model is noisy where a part's increase is within noise), and
   the best measured one is reported;
3. with ``--mixed``: per-expert widths (``frontier_mixed.py``): sensitivities on the calibration text,
   the exact ILP over the experts' widths for every combination of non-expert widths (3/4/5/6/8 per
   expert, 4/5/6/8 per non-expert part) at each llama.cpp budget, the ``--mixed-top`` best-ranked
   plans scored on the held-out chunks like the rest; the best of both stages is reported.

Bits per weight for both = tensor bytes × 8 / checkpoint parameters (GGUF: every tensor incl. norms
and the f32 router; moec: packed weights, scales, zeros, float router and norms).

The best plan of each point is written to ``WORK/frontier-<type>.json`` (a plan file for ``moec compile
--plan``; plans with 5/6-bit widths need a target preset whose ``allowed_bits`` include them).

Usage::

    python benchmarks/frontier.py reference/checkpoint --llamacpp /work/llamacpp --work /tmp/frontier
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_common import (PAIRS, add_scoring_args, convert, frontier_row, gguf_tensor_bytes,  # noqa: E402
                         llama_perplexity, moec_perplexity, param_count, print_frontier, quantize, same_tokens)

PARTS = ("experts", "attn_qko", "attn_v", "embeddings", "lm_head")
#: Plan ``tensors`` keys of the non-expert parts (matched in order: v_proj before the attention group).
KEYS = {"attn_v": r"re:layers\.[0-9]+\.attn\.v_proj\.weight", "attn_qko": "attention", "embeddings": "embeddings",
        "lm_head": "lm_head"}
BITS = (2, 3, 4, 8)
#: Widths tried per part: the LM head also at 6 bits (llama.cpp keeps it at Q6_K), the experts
#: also at 5 (int5 and int6 have kernels on x86 and ARM, not CUDA).
PART_BITS = {p: BITS for p in PARTS} | {"lm_head": (2, 3, 4, 6, 8), "experts": (2, 3, 4, 5, 8)}


def parse_group(spec: str) -> tuple[int, str]:
    """``"32"`` -> (32, "fp16"); ``"32u8"`` -> (32, "u8")."""
    m = re.fullmatch(r"([0-9]+)([a-z][a-z0-9]*)?", spec)
    if not m:
        raise SystemExit(f"bad --groups entry {spec!r}; expected e.g. 64 or 32u8")
    return int(m.group(1)), m.group(2) or "fp16"


def group_tag(group: tuple[int, str]) -> str:
    """``g32`` (fp16 scales: the key earlier runs cached under) or ``g32u8``."""
    return f"g{group[0]}" + ("" if group[1] == "fp16" else group[1])


def part_plan(cfg, bits: dict[str, int], group: tuple[int, str], method: str):
    """A plan with each part of ``PARTS`` at ``bits[part]`` (16 = float; missing parts float), router float."""
    from moec.core.plan import BitPlan

    e = bits.get("experts", 16)
    experts = {layer: {x: e for x in range(cfg.num_experts)} for layer in cfg.moe_layers}
    tensors = {"router": 16}
    tensors.update({KEYS[p]: bits.get(p, 16) for p in ("attn_v", "attn_qko", "embeddings", "lm_head")})
    name = " ".join(f"{p}:{bits.get(p, 16)}" for p in PARTS)
    return BitPlan(experts, tensors, group[0], method, cfg.fingerprint(), {"policy": f"frontier {name}"},
                   scales=group[1]).validate(cfg)


def describe(bits: dict[str, int], group: tuple[int, str]) -> str:
    return f"experts {bits['experts']}, attn q/k/o {bits['attn_qko']} v {bits['attn_v']}, " \
           f"embed {bits['embeddings']}, head {bits['lm_head']}, {group_tag(group)}"


class Cache:
    """Measured perplexities kept in ``work/frontier-cache.json`` (keyed by what was measured)."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}

    def get(self, key: str, fn):
        if key not in self.data:
            t0 = time.perf_counter()
            self.data[key] = fn()
            print(f"  {key}: {self.data[key]:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
            self.path.write_text(json.dumps(self.data, indent=1))
        return self.data[key]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_scoring_args(ap, ",".join(PAIRS))
    ap.add_argument("--groups", default="32,64,32u8,64u8",
                    help="group sizes, each with fp16 scales (64) or double-quantized u8 scales (32u8)")
    ap.add_argument("--method", default="mse")
    ap.add_argument("--chunks", type=int, default=-1, help="score only the first N chunks (both engines; "
                    "llama-perplexity --chunks N); -1: all")
    ap.add_argument("--search-chunks", type=int, default=16)
    ap.add_argument("--top", type=int, default=3)
    ap.add_argument("--work", type=Path, default=None, help="GGUF files and the perplexity cache (reused)")
    ap.add_argument("--mixed", action="store_true", help="also search per-expert widths (frontier_mixed.py)")
    ap.add_argument("--calib", type=Path, default=Path(__file__).resolve().parents[1] / "reference/data/calib.txt")
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--mixed-top", type=int, default=3)
    ap.add_argument("--mixed-expert-bits", default="4,5,6,8",
                    help="per-expert widths the mixed stage may use (of 3,4,5,6,8); 3 is left out by default: "
                         "experts rare on the calibration text went to 3 bits and cost more on the held-out text")
    ap.add_argument("--mixed-parts", default="",
                    help="also score these non-expert widths 'attn_qko,attn_v,embeddings,lm_head', optionally "
                         "'/' and the expert widths for this entry (';'-separated, e.g. 6,8,6,6;6,6,6,6/3,4,5,6,8) "
                         "at every point they fit, experts by the same ILP")
    ap.add_argument("--mixed-group", default="64", help="group size and scale format of the mixed plans")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="moec-frontier-"))
    work.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(args.threads)
    from moec.models.checkpoint import load_checkpoint
    from moec.profile.data import context_chunks
    from moec.quant.accounting import plan_memory

    root, n_ctx = args.llamacpp, args.ctx
    cache = Cache(work / "frontier-cache.json")
    print(f"load average before: {os.getloadavg()}", flush=True)
    f32 = convert(args.checkpoint, root, work)
    base, llama_ids = llama_perplexity(root, f32, args.data, n_ctx, args.threads, want_tokens=True,
                                       chunks=args.chunks)
    ids, bos = same_tokens(args.checkpoint, args.data, llama_ids)
    chunks = context_chunks(ids, n_ctx, bos)
    search = chunks[:args.search_chunks]
    n_params = param_count(args.checkpoint)
    model = load_checkpoint(args.checkpoint)
    cfg = model.cfg
    tag = f"{args.data.name}:{n_ctx}:{len(chunks)}"
    print(f"same token ids in both engines: {len(ids)} tokens, {len(chunks)} chunks; llama.cpp f32 {base:.4f}",
          flush=True)
    mbase = cache.get(f"{tag} FP32", lambda: moec_perplexity(model, None, chunks, n_ctx))
    sbase = cache.get(f"{tag}[:{len(search)}] FP32", lambda: moec_perplexity(model, None, search, n_ctx))

    llama = {}
    for t in args.types.split(","):
        g = quantize(root, f32, t)
        ppl = cache.get(f"{tag} llama.cpp {t}", lambda g=g: llama_perplexity(root, g, args.data, n_ctx, args.threads,
                                                                    chunks=args.chunks)[0])
        llama[t] = (gguf_tensor_bytes(root, g), ppl)

    groups = [parse_group(x) for x in args.groups.split(",")]
    sens: dict[tuple[str, int, tuple[int, str]], float] = {}
    for group in groups:
        for part in PARTS:
            for b in PART_BITS[part]:
                plan = part_plan(cfg, {part: b}, group, args.method)
                key = f"{tag}[:{len(search)}] {args.method} {group_tag(group)} {part}:{b}"
                ppl = cache.get(key, lambda plan=plan: moec_perplexity(model, plan, search, n_ctx))
                sens[(part, b, group)] = math.log(ppl / sbase)

    combos = []
    for group in groups:
        # bytes are additive over tensors: all-8-bit bytes plus each part's change from 8 bits (exact)
        ref = {p: 8 for p in PARTS}
        base_bytes = plan_memory(model, part_plan(cfg, ref, group, args.method)).total
        delta = {(p, b): plan_memory(model, part_plan(cfg, {**ref, p: b}, group, args.method)).total - base_bytes
                 for p in PARTS for b in PART_BITS[p]}
        for widths in itertools.product(*(PART_BITS[p] for p in PARTS)):
            bits = dict(zip(PARTS, widths))
            nbytes = base_bytes + sum(delta[(p, bits[p])] for p in PARTS)
            combos.append((sum(sens[(p, bits[p], group)] for p in PARTS), nbytes, bits, group))
    combos.sort(key=lambda c: c[0])

    if args.mixed:
        import frontier_mixed as fm

        mgroup = parse_group(args.mixed_group)
        calib = fm.calib_chunks(args.checkpoint, args.calib, n_ctx, args.calib_tokens)
        part, items, loss = fm.sensitivities(model, calib, n_ctx, mgroup, args.method, cache,
                                             f"{args.calib.name}:{n_ctx}:{len(calib)}")
        fixed = fm.fixed_bytes(model, mgroup, args.method)

    rows = []
    for t, (lbytes, lppl) in sorted(llama.items(), key=lambda kv: kv[1][0]):
        fits = [c for c in combos if c[1] <= lbytes]
        # also try the plan that spends the most of the budget, the best-ranked one with the widest
        # experts (their 4/5/8-bit sensitivities differ by less than their noise) and the widest
        # uniform plan that fits
        widest = max(c[2]["experts"] for c in fits)
        extra = [max(fits, key=lambda c: c[1]), next(c for c in fits if c[2]["experts"] == widest),
                 max((c for c in fits if len(set(c[2].values())) == 1), key=lambda c: c[1], default=None)]
        fits = fits[:args.top]
        fits += [c for c in extra if c is not None and c not in fits]
        best = None
        for rank, (_, nbytes, bits, group) in enumerate(fits):
            plan = part_plan(cfg, bits, group, args.method)
            assert plan_memory(model, plan).total == nbytes
            ppl = cache.get(f"{tag} {args.method} {group_tag(group)} {describe(bits, group)}",
                            lambda plan=plan: moec_perplexity(model, plan, chunks, n_ctx))
            if best is None or ppl < best[0]:
                best = (ppl, nbytes, describe(bits, group), plan)
        if args.mixed:
            allowed = tuple(int(b) for b in args.mixed_expert_bits.split(","))
            found = fm.candidates(model, lbytes, part, items, loss, mgroup, fixed, args.mixed_top, allowed)
            for spec in filter(None, args.mixed_parts.split(";")):
                w, _, own = spec.partition("/")
                w = tuple(int(b) for b in w.split(","))
                found += fm.candidates(model, lbytes, part, items, loss, mgroup, {w: fixed[w]}, 1,
                                       tuple(int(b) for b in own.split(",")) if own else allowed)
            for _, nbytes, bits, widths in found:
                plan = fm.mixed_plan(cfg, widths, bits, mgroup, args.method)
                assert plan_memory(model, plan).total == nbytes <= lbytes
                text = fm.describe_mixed(widths, bits, mgroup)
                ident = ",".join(str(widths[it]) for it in items)
                ppl = cache.get(f"{tag} {args.method} mixed {text} [{ident}]",
                                lambda plan=plan: moec_perplexity(model, plan, chunks, n_ctx))
                if ppl < best[0]:
                    best = (ppl, nbytes, text, plan)
        ppl, nbytes, text, plan = best
        plan.save(work / f"frontier-{t}.json")  # compile it with a preset whose allowed_bits include its widths
        rows.append(frontier_row(t, lbytes, lppl, base, text, nbytes, ppl, mbase, n_params))
    print_frontier(rows, len(chunks), n_ctx, base, mbase, "best moec plan with no more bytes",
                   f"; method {args.method}")

if __name__ == "__main__":
    main()
