"""Side-by-side decode/prefill speed and size of moec and llama.cpp at matching bits, interleaved round by round.

Needs a llama.cpp build made by ``tools/setup_llamacpp.sh`` (outside the repo; nothing in the test
suite uses it). The checkpoint is converted with llama.cpp's own converter (to f32 GGUF; an
unrecognised BPE pre-tokenizer hash falls back to ``gpt-2``, see notes/llama-cpp-peer.md), then
quantized to each type; moec compiles the matching uniform plan for the host. Each round times
every pair (moec decode 64 steps / prefill 64 tokens at moec's own thread choice; ``llama-bench -p 0 -n 64``
and ``-p 64 -n 0`` at llama.cpp's best of ``-t 1`` and ``-t THREADS`` with ``OMP_WAIT_POLICY`` passive or
active, see :func:`llama_best`); the table gives medians and medians of per-round ratios.

Perplexity (before the speed rounds; ``--skip ppl`` leaves it out): ``llama-perplexity -c CTX -b CTX``
on ``--data`` for f32 and each type; moec scores its FP32 model and the matching ``uniform:B`` plan
(the compile default quantizer, fake-quantized in torch: the numerics the bundle reproduces) on
llama.cpp's own token ids, chunks and positions (see ``peer_common.py``), after checking that its
tokenizer gives the same ids. Bits per weight for both = tensor bytes (GGUF tensors incl. norms and
router; moec packed weights incl. norms) × 8 / checkpoint parameters.

Usage::

    python benchmarks/peer_llamacpp.py reference/checkpoint --llamacpp /work/llamacpp [--rounds 3]
    python benchmarks/peer_llamacpp.py reference/checkpoint --skip speed   # the perplexity table only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_common import (LLAMA_ENV, PAIRS, convert, gguf_tensor_bytes, llama_perplexity,  # noqa: E402
                         moec_perplexity, param_count, quantize, same_tokens)

def llama_bench(root: Path, gguf: Path, threads: int, prompt: int, gen: int, env: dict | None = None) -> float:
    """tok/s from one llama-bench run (its mean over its own repetitions)."""
    out = subprocess.run([str(root / "build/bin/llama-bench"), "-m", str(gguf), "-t", str(threads),
                          "-p", str(prompt), "-n", str(gen), "-r", "3", "-o", "jsonl"],
                         env=env or LLAMA_ENV, check=True, capture_output=True, text=True).stdout
    rows = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
    return float(rows[-1]["avg_ts"])


def llama_best(root: Path, gguf: Path, threads: list[int], prompt: int, gen: int) -> tuple[float, str]:
    """llama.cpp's best tok/s over thread counts and OpenMP wait policies, and the setting that gave it.

    On a small model a 2-thread llama.cpp spends its step in thread barriers: with
    ``OMP_WAIT_POLICY=PASSIVE`` (needed on a loaded machine) it fell to ~250 tok/s on a quiet one,
    against ~5000 with one thread. moec picks its own thread count for small bundles, so llama.cpp
    gets its best too.
    """
    best = (0.0, "")
    for t in sorted({1, *threads}):
        for policy in ("PASSIVE", "ACTIVE") if t > 1 else ("PASSIVE",):
            tps = llama_bench(root, gguf, t, prompt, gen, dict(LLAMA_ENV, OMP_WAIT_POLICY=policy))
            best = max(best, (tps, f"-t {t}" + (f" {policy.lower()}" if t > 1 else "")))
    return best


def moec_compile(ckpt: Path, bits: int, out: Path) -> Path:
    bundle = out / f"moec-u{bits}"
    if not (bundle / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "moec", "compile", str(ckpt), "--plan", f"uniform:{bits}",
                        "--target", "host", "--out", str(bundle)], check=True)
    return bundle


def moec_times(bundle: Path, threads: int, n: int = 64) -> tuple[float, float]:
    """(decode tok/s over ``n`` steps after a 16-token prompt, prefill tok/s of an ``n``-token prompt)."""
    from moec.runtime.session import BundleSession
    sess = BundleSession(bundle, threads=threads)
    try:
        prompt = [3 + i % 97 for i in range(n)]
        sess.reset()
        sess.prefill(prompt[:16])
        t0 = time.perf_counter()
        for i in range(n):
            sess.step(5 + i % 50)
        decode = n / (time.perf_counter() - t0)
        sess.reset()
        t0 = time.perf_counter()
        sess.prefill(prompt)
        prefill = n / (time.perf_counter() - t0)
        return decode, prefill
    finally:
        sess.close()


def perplexity_rows(args, f32: Path, ggufs: dict[str, Path], n_params: int) -> list[str]:
    """Markdown rows: each llama.cpp type and its moec uniform plan scored on the same tokens and positions."""
    from moec.core.plan import resolve_plan
    from moec.models.checkpoint import load_checkpoint
    from moec.profile.data import context_chunks
    from moec.quant.accounting import float32_memory, plan_memory

    root, n_ctx = args.llamacpp, args.ctx
    base, llama_ids = llama_perplexity(root, f32, args.data, n_ctx, args.threads, want_tokens=True,
                                       chunks=args.chunks)
    ids, bos = same_tokens(args.checkpoint, args.data, llama_ids)
    chunks = context_chunks(ids, n_ctx, bos)
    model = load_checkpoint(args.checkpoint)
    mbase = moec_perplexity(model, None, chunks, n_ctx)
    print(f"token ids identical in both engines: {len(ids)} tokens, {len(chunks)} chunks of {n_ctx}, "
          f"{len(chunks) * (n_ctx - 1 - n_ctx // 2)} scored positions (second half of each chunk), "
          f"BOS {'replaces each chunk start' if bos is not None else 'not used'}", flush=True)
    rows = [f"| f32 | {gguf_tensor_bytes(root, f32) / 1e6:.2f} ({gguf_tensor_bytes(root, f32) * 8 / n_params:.2f}) "
            f"| {base:.4f} | FP32 | {float32_memory(model) / 1e6:.2f} ({float32_memory(model) * 8 / n_params:.2f}) "
            f"| {mbase:.4f} | – |"]
    moec = {}
    for t, gguf in ggufs.items():
        ppl, _ = llama_perplexity(root, gguf, args.data, n_ctx, args.threads, chunks=args.chunks)
        bits = PAIRS[t]
        if bits not in moec:
            plan = resolve_plan(f"uniform:{bits}", model.cfg)
            moec[bits] = (plan_memory(model, plan).total, moec_perplexity(model, plan, chunks, n_ctx))
        mb, mppl = moec[bits]
        gb = gguf_tensor_bytes(root, gguf)
        rows.append(f"| {t} | {gb / 1e6:.2f} ({gb * 8 / n_params:.2f}) | {ppl:.4f} ({(ppl / base - 1) * 100:+.2f} %) "
                    f"| uniform:{bits} | {mb / 1e6:.2f} ({mb * 8 / n_params:.2f}) | {mppl:.4f} "
                    f"({(mppl / mbase - 1) * 100:+.2f} %) | {'yes' if mb <= gb and mppl <= ppl else 'no'} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--llamacpp", type=Path, default=Path("/work/llamacpp"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp's most threads (its best of 1..this, both "
                    "OpenMP wait policies, is reported); moec uses its default pool "
                    "choice unless --moec-threads is given")
    ap.add_argument("--moec-threads", type=int, default=None)
    ap.add_argument("--types", default=",".join(PAIRS))
    ap.add_argument("--work", type=Path, default=None, help="where GGUF files and bundles are kept (reused)")
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1] / "reference/data/heldout.txt",
                    help="held-out text both engines are scored on")
    ap.add_argument("--ctx", type=int, default=256, help="llama-perplexity context (-c, -b); moec scores the "
                    "same chunks and positions")
    ap.add_argument("--chunks", type=int, default=-1, help="score only the first N chunks in both engines "
                    "(llama-perplexity --chunks N); -1: all")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: speed, ppl")
    args = ap.parse_args()
    skip = set(args.skip.split(",")) - {""}
    work = args.work or Path(tempfile.mkdtemp(prefix="moec-peer-"))
    work.mkdir(parents=True, exist_ok=True)
    types = args.types.split(",")
    f32 = convert(args.checkpoint, args.llamacpp, work)
    n_params = param_count(args.checkpoint)
    ggufs = {t: quantize(args.llamacpp, f32, t) for t in types}
    if "ppl" not in skip:
        rows = perplexity_rows(args, f32, ggufs, n_params)
        print(f"\nperplexity, {args.data.name}, llama-perplexity -c {args.ctx} -b {args.ctx} --chunks {args.chunks} "
              f"positions; bpw = "
              f"tensor bytes x 8 / {n_params} checkpoint parameters\n")
        print("| llama.cpp type | tensor MB (bpw) | llama.cpp PPL (vs f32) | moec plan | weight MB (bpw) | "
              "moec PPL (vs FP32) | moec no larger and no worse |")
        print("|---|---|---|---|---|---|---|")
        print("\n".join(rows) + "\n", flush=True)
    if "speed" in skip:
        return
    bundles = {b: moec_compile(args.checkpoint, b, work) for b in sorted({PAIRS[t] for t in types})}
    threads = [args.threads]
    print(f"load average before: {os.getloadavg()}", flush=True)
    res: dict[str, list[tuple[float, float, float, float]]] = {t: [] for t in types}
    for r in range(args.rounds):
        for t in types:
            md, mp = moec_times(bundles[PAIRS[t]], args.moec_threads)
            ld, ldw = llama_best(args.llamacpp, ggufs[t], threads, 0, 64)
            lp, lpw = llama_best(args.llamacpp, ggufs[t], threads, 64, 0)
            res[t].append((md, mp, ld, lp))
            print(f"round {r} {t}: moec decode {md:.0f} prefill {mp:.0f} | llama.cpp decode {ld:.0f} ({ldw}) "
                  f"prefill {lp:.0f} ({lpw}) tok/s", flush=True)
    print(f"load average after: {os.getloadavg()}\n")
    print("| llama.cpp type | moec plan | llama.cpp MB (bpw) | moec MB (bpw) | decode tok/s llama.cpp / moec | "
          "moec/llama.cpp decode | prefill tok/s (64) llama.cpp / moec | moec/llama.cpp prefill |")
    print("|---|---|---|---|---|---|---|---|")
    med = statistics.median
    for t in types:
        bundle = bundles[PAIRS[t]]
        mbytes = json.loads((bundle / "manifest.json").read_text())["weight_bytes"]
        gbytes = ggufs[t].stat().st_size  # the whole file (tensors + tokenizer and other metadata)
        rows = res[t]
        print(f"| {t} | uniform:{PAIRS[t]} | {gbytes / 1e6:.2f} ({gbytes * 8 / n_params:.2f}) | "
              f"{mbytes / 1e6:.2f} ({mbytes * 8 / n_params:.2f}) | {med(x[2] for x in rows):.0f} / "
              f"{med(x[0] for x in rows):.0f} | {med(x[0] / x[2] for x in rows):.2f}x | "
              f"{med(x[3] for x in rows):.0f} / {med(x[1] for x in rows):.0f} | "
              f"{med(x[1] / x[3] for x in rows):.2f}x |")


if __name__ == "__main__":
    main()
