"""Score the frontier's saved plans (``WORK/frontier-<type>.json``) and their llama.cpp types on the whole text.

``frontier.py`` searches on the first ``--chunks`` chunks; this scores its best plan of each point, and the
llama.cpp type it is paired with, on every chunk of the held-out text (same tokens and positions,
``peer_common.py``), and says whether moec dominates (no more bytes, no higher perplexity).

Usage::

    python benchmarks/frontier_rescore.py reference/checkpoint --work /tmp/frontier --types Q4_0,Q4_K_M
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_common import (convert, gguf_tensor_bytes, llama_perplexity, moec_perplexity, param_count,  # noqa: E402
                         quantize, same_tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--llamacpp", type=Path, default=Path("/work/llamacpp"))
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1] / "reference/data/heldout.txt")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default="Q4_0,Q4_K_M")
    ap.add_argument("--work", type=Path, required=True, help="frontier.py's --work (GGUFs and frontier-<type>.json)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from moec.core.plan import BitPlan
    from moec.models.checkpoint import load_checkpoint
    from moec.profile.data import context_chunks
    from moec.quant.accounting import plan_memory

    root, n_ctx = args.llamacpp, args.ctx
    print(f"load average before: {os.getloadavg()}", flush=True)
    f32 = convert(args.checkpoint, root, args.work)
    base, ids = llama_perplexity(root, f32, args.data, n_ctx, args.threads, want_tokens=True)
    ids, bos = same_tokens(args.checkpoint, args.data, ids)
    chunks = context_chunks(ids, n_ctx, bos)
    model = load_checkpoint(args.checkpoint)
    n_params = param_count(args.checkpoint)
    mbase = moec_perplexity(model, None, chunks, n_ctx)
    rows = []
    for t in args.types.split(","):
        g = quantize(root, f32, t)
        lbytes, lppl = gguf_tensor_bytes(root, g), llama_perplexity(root, g, args.data, n_ctx, args.threads)[0]
        plan = BitPlan.load(args.work / f"frontier-{t}.json").validate(model.cfg)
        nbytes = plan_memory(model, plan).total
        ppl = moec_perplexity(model, plan, chunks, n_ctx)
        dom = nbytes <= lbytes and ppl <= lppl
        print(f"  {t}: llama.cpp {lppl:.4f}, moec {ppl:.4f}", flush=True)
        rows.append(f"| {t} | {lbytes / 1e6:.3f} ({lbytes * 8 / n_params:.2f}) | {lppl:.4f} ({(lppl / base - 1) * 100:+.2f} %) "
                    f"| {plan.provenance.get('policy', '')} | {nbytes / 1e6:.3f} ({nbytes * 8 / n_params:.2f}) | "
                    f"{ppl:.4f} ({(ppl / mbase - 1) * 100:+.2f} %) | "
                    f"{'**yes**' if dom else f'no ({(ppl / lppl - 1) * 100:+.2f} % perplexity)'} |")
    print(f"load average after: {os.getloadavg()}\n")
    print(f"{len(chunks)} chunks of {n_ctx} ({len(chunks) * (n_ctx - 1 - n_ctx // 2)} scored positions); "
          f"float baselines: llama.cpp f32 {base:.4f}, moec FP32 {mbase:.4f}\n")
    print("| llama.cpp type | tensor MB (bpw) | llama.cpp PPL (vs f32) | moec plan (frontier-<type>.json) | "
          "moec MB (bpw) | moec PPL (vs FP32) | moec dominates |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
