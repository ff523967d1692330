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
from peer_common import (add_scoring_args, convert, frontier_row, gguf_tensor_bytes,  # noqa: E402
                         llama_perplexity, moec_perplexity, param_count, print_frontier, quantize, same_tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_scoring_args(ap, "Q4_0,Q4_K_M")
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
        print(f"  {t}: llama.cpp {lppl:.4f}, moec {ppl:.4f}", flush=True)
        rows.append(frontier_row(t, lbytes, lppl, base, plan.provenance.get("policy", ""), nbytes, ppl, mbase,
                                 n_params))
    print_frontier(rows, len(chunks), n_ctx, base, mbase, "moec plan (frontier-<type>.json)")

if __name__ == "__main__":
    main()
