"""Side-by-side decode/prefill speed and size of moec and llama.cpp at matching bits, interleaved round by round.

Needs a llama.cpp build made by ``tools/setup_llamacpp.sh`` (outside the repo; nothing in the test
suite uses it). Models: a checkpoint given on the command line (e.g. the reference model) and/or,
with ``--olmoe LAYERS``, a random-weight OLMoE-1B-7B-shaped checkpoint (hidden 2048, 16 heads,
64 experts × 1024, top-8, vocab 50304; ``scale_checkpoint.write_checkpoint``, written once into
``--work``). Each checkpoint is converted with llama.cpp's own converter (to f32 GGUF; an
unrecognised BPE pre-tokenizer hash falls back to ``gpt-2``, see notes/llama-cpp-peer.md) and
quantized to each type (Q8_0, Q4_0, Q4_K_M, Q3_K_S, Q2_K); moec compiles the same checkpoint to
the matching ``uniform:B`` plan (``mse``, group 64) for the host, once per ``--activations`` mode,
plus the documented mixed plan of ``peer_bundles.mixed_plan`` (experts alternating 4/2 bits, other
weights 4 bits) for the "mixed vs uniform:8" table. GGUF files and bundles are kept in ``--work``
and reused; a bundle this moec refuses (an older bundle format) or built with other activations or
another plan is rebuilt (``peer_bundles.bundle_is_current``).

Activations: ``--activations float32,int8`` gives a moec row per mode. ``float32`` is moec's exact
default; ``int8`` quantizes each activation row to 8 bits per group for VNNI dot products
(decode GEMVs and prefill grouped GEMMs). llama.cpp's quantized types always do the latter: its
CPU matmuls quantize the activations to 8 bits (Q8_0 / Q8_K blocks) for their integer dot
products, so the int8 rows are the like-for-like numerics and the float32 rows give llama.cpp
that advantage.

Each round times every moec bundle (``decode``: 64 steps after a 16-token prompt; ``ppN``: a
prefill of N tokens, ``--prompts 64,512``; each the mean of ``--reps`` runs after a warm-up) at
moec's own thread choice, and every GGUF with ``llama-bench -p 64,512 -n 64 -r REPS``. llama.cpp
gets its best setting: before its first timing a short probe (``-r 1``, 16 generated tokens, the
shortest prompt) runs each GGUF at ``-t 1`` and at ``-t THREADS`` with ``OMP_WAIT_POLICY`` passive
and active, and every round times each test at the probe's winner (prefill: the shortest prompt's
winner for every length; a test that then runs at under half its probe speed is timed at every
setting again and keeps the best: on a loaded machine an actively waiting ``-t 2`` can win the
probe and collapse 10x in the rounds); ``--llama-search every`` instead times every setting in
every round and keeps the fastest (about 3x the llama.cpp time). Rounds are interleaved
(bundle by bundle, each moec plan next to its llama.cpp types); tables give medians over rounds
and medians of per-round ratios, with the load average at the start and end of each round.

Sizes: file MB = the whole GGUF file / all bundle files; bits per weight = tensor bytes × 8 /
checkpoint parameters, for both (GGUF tensors incl. norms and router, with llama.cpp's own type
choice for embedding and output; moec's packed weights incl. norms).

Perplexity (``--skip ppl`` leaves it out; only for a real checkpoint: the OLMoE-shaped one has
random weights, so its perplexity means nothing and is not printed): ``llama-perplexity -c CTX -b
CTX`` on ``--data`` for f32 and each type; moec scores its FP32 model and the matching
``uniform:B`` plan (fake-quantized in torch: the numerics the bundle reproduces) on llama.cpp's
own token ids, chunks and positions (see ``peer_common.py``).

Usage::

    python benchmarks/peer_llamacpp.py reference/checkpoint --olmoe 4 --work /work/bench-data/peer7 \\
        --activations float32,int8 --rounds 2 --skip ppl
    python benchmarks/peer_llamacpp.py reference/checkpoint --skip speed   # the perplexity table only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_bundles import MIXED, build_bundles, bundle_file_bytes  # noqa: E402
from peer_common import (GGUF_BASES, PAIRS, convert, f32_name, gguf_tensor_bytes, llama_perplexity,  # noqa: E402
                         moec_perplexity, param_count, quantize, quantized_name, same_tokens)
from peer_speed import label, llama_at, llama_probe, llama_times, moec_times, settings  # noqa: E402



def olmoe_checkpoint(work: Path, layers: int) -> Path:
    """The random OLMoE-shaped HF checkpoint in ``work/olmoe-lN/checkpoint``, written once (into a
    temporary sibling, renamed when complete)."""
    from scale_checkpoint import write_checkpoint

    ckpt = work / f"olmoe-l{layers}" / "checkpoint"
    if not (ckpt / "config.json").exists():
        tmp = ckpt.with_name("checkpoint.part")
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"writing the OLMoE-shaped checkpoint ({layers} layers) to {ckpt}", flush=True)
        write_checkpoint(tmp, layers)
        tmp.rename(ckpt)
    return ckpt


def gguf_files(ckpt: Path, root: Path, out: Path, types: list[str], base: str = "f32") -> dict[str, Path]:
    """Each type's GGUF (converting to the ``base`` GGUF first only if some type is missing)."""
    b = f32_name(ckpt, out, base)
    if not all(quantized_name(b, t).exists() for t in types):
        b = convert(ckpt, root, out, base)
    return {t: quantize(root, b, t) for t in types}


def perplexity_rows(args, ckpt: Path, f32: Path, ggufs: dict[str, Path], n_params: int) -> list[str]:
    """Markdown rows: each llama.cpp type and its moec uniform plan scored on the same tokens and positions."""
    from moec.core.plan import resolve_plan
    from moec.models.checkpoint import load_checkpoint
    from moec.profile.data import context_chunks
    from moec.quant.accounting import float32_memory, plan_memory

    root, n_ctx = args.llamacpp, args.ctx
    base, llama_ids = llama_perplexity(root, f32, args.data, n_ctx, args.threads, want_tokens=True,
                                       chunks=args.chunks)
    ids, bos = same_tokens(ckpt, args.data, llama_ids)
    chunks = context_chunks(ids, n_ctx, bos)
    model = load_checkpoint(ckpt)
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


def print_perplexity(args, ckpt: Path, ggufs: dict[str, Path], n_params: int, out: Path) -> None:
    f32 = convert(ckpt, args.llamacpp, out)
    rows = perplexity_rows(args, ckpt, f32, ggufs, n_params)
    print(f"\nperplexity, {args.data.name}, llama-perplexity -c {args.ctx} -b {args.ctx} --chunks {args.chunks} "
          f"positions; bpw = tensor bytes x 8 / {n_params} checkpoint parameters\n")
    print("| llama.cpp type | tensor MB (bpw) | llama.cpp PPL (vs f32) | moec plan | weight MB (bpw) | "
          "moec PPL (vs FP32) | moec no larger and no worse |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows) + "\n", flush=True)


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def time_rounds(args, ggufs: dict[str, Path], bundles: dict[tuple[str, str], Path],
                tests: list[str]) -> tuple[dict, dict, list[str]]:
    """Interleaved rounds: ``(moec {(plan, act): [per-round tok/s dicts]}, llama.cpp {type: [...]},
    winners {type: {test: setting}} in ``llama``'s ``"settings"`` key, per-round load lines)."""
    prompts = [int(t[2:]) for t in tests if t.startswith("pp")]
    moec: dict[tuple[str, str], list[dict]] = {k: [] for k in bundles}
    llama: dict[str, list[dict]] = {t: [] for t in ggufs}
    winners: dict[str, dict[str, tuple[int, str]]] = {}
    probes: dict[str, dict[str, float]] = {}
    loads = []
    order = sorted({plan for plan, _ in bundles}, key=lambda p: (p == MIXED, -int(p.split(":")[-1]) if ":" in p else 0))
    for r in range(args.rounds):
        start = load()
        for plan in order:
            for key in [k for k in bundles if k[0] == plan]:
                moec[key].append(moec_times(bundles[key], prompts, args.moec_threads, args.reps))
                print(f"round {r} moec {plan} {key[1]}: " + fmt(moec[key][-1]), flush=True)
            for t in [t for t in ggufs if plan == f"uniform:{PAIRS[t]}"]:
                if args.llama_search == "every":
                    best, won = llama_times(args.llamacpp, ggufs[t], tests, settings(args.threads), args.reps)
                    winners.setdefault(t, won)
                else:
                    if t not in winners:
                        winners[t], probes[t] = llama_probe(args.llamacpp, ggufs[t], tests, args.threads)
                    best, won = llama_at(args.llamacpp, ggufs[t], winners[t], probes[t], args.reps, args.threads)
                llama[t].append(best)
                print(f"round {r} llama.cpp {t}: " + fmt(best, won), flush=True)
        loads.append(f"round {r}: load average (1/5/15 min) {start} at the start, {load()} at the end")
        print(loads[-1], flush=True)
    return moec, {"times": llama, "settings": winners}, loads


def fmt(times: dict[str, float], won: dict | None = None) -> str:
    return ", ".join(f"{k} {v:.1f}" + (f" ({label(won[k])})" if won else "") for k, v in times.items()) + " tok/s"


def speed_tables(name: str, ggufs: dict[str, Path], bundles: dict, moec: dict, llama: dict, loads: list[str],
                 tests: list[str], acts: list[str], n_params: int, root: Path, share: float) -> None:
    med = statistics.median
    heads = {"decode": "decode"} | {t: f"prefill {t[2:]}" for t in tests if t.startswith("pp")}
    print(f"\n### {name}: moec vs llama.cpp, tok/s llama.cpp / moec (median of rounds), moec/llama.cpp (median of "
          f"per-round ratios)\n")
    print("| llama.cpp type | moec plan | moec act. | llama.cpp file MB (bpw) | moec files MB (bpw) | "
          + " | ".join(f"{heads[t]} llama.cpp / moec | moec/llama.cpp" for t in tests) + " |")
    print("|" + "---|" * (5 + 2 * len(tests)))
    weight = {k: json.loads((b / "manifest.json").read_text())["weight_bytes"] for k, b in bundles.items()}
    for t, gguf in ggufs.items():
        gb, gt = gguf.stat().st_size, gguf_tensor_bytes(root, gguf)
        for act in acts:
            key = (f"uniform:{PAIRS[t]}", act)
            m, lt = moec[key], llama["times"][t]
            cells = []
            for test in tests:
                ratios = [mr[test] / lr[test] for mr, lr in zip(m, lt)]
                cells.append(f"{med(x[test] for x in lt):.1f} / {med(x[test] for x in m):.1f} | {med(ratios):.2f}x")
            print(f"| {t} | {key[0]} | {act} | {gb / 1e6:.1f} ({gt * 8 / n_params:.2f}) | "
                  f"{bundle_file_bytes(bundles[key]) / 1e6:.1f} ({weight[key] * 8 / n_params:.2f}) | "
                  + " | ".join(cells) + " |")
    print("\nllama.cpp settings (probe winners; with --llama-search every: the first round's): " + "; ".join(
        f"{t} " + ", ".join(f"{x} {label(s)}" for x, s in won.items()) for t, won in llama["settings"].items()))
    print("\n".join(loads))
    if not any(plan == MIXED for plan, _ in bundles):
        return
    print(f"\n### {name}: mixed plan (experts 4/2 bits alternating, other weights 4 bits) vs uniform:8, moec "
          "decode\n")
    print("| moec act. | uniform:8 weight MB | mixed weight MB (share of uniform:8) | decode tok/s uniform:8 / mixed | "
          "mixed / uniform:8 (median of per-round ratios) | per round | at the median step: tok/s uniform:8 / mixed "
          "| mixed / uniform:8 |")
    print("|---|---|---|---|---|---|---|---|")
    for act in acts:
        u8, mx = moec[("uniform:8", act)], moec[(MIXED, act)]
        ratios = [b["decode"] / a["decode"] for a, b in zip(u8, mx)]
        p50 = [b["decode_p50"] / a["decode_p50"] for a, b in zip(u8, mx)]
        print(f"| {act} | {weight[('uniform:8', act)] / 1e6:.1f} | {weight[(MIXED, act)] / 1e6:.1f} "
              f"({share * 100:.0f} %) | {med(x['decode'] for x in u8):.1f} / {med(x['decode'] for x in mx):.1f} | "
              f"{med(ratios):.2f}x | {', '.join(f'{x:.2f}x' for x in ratios)} | "
              f"{med(x['decode_p50'] for x in u8):.1f} / {med(x['decode_p50'] for x in mx):.1f} | {med(p50):.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path, nargs="?", help="a real checkpoint (e.g. reference/checkpoint); "
                    "omit for the OLMoE-shaped model only")
    ap.add_argument("--olmoe", type=int, default=0, metavar="LAYERS",
                    help="also the random OLMoE-shaped model with this many layers (written into --work once)")
    ap.add_argument("--llamacpp", type=Path, default=Path("/work/llamacpp"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2, help="timed runs per test per round (both engines)")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp's most threads (its best of 1 and this, both "
                    "OpenMP wait policies, is reported); moec uses its default pool "
                    "choice unless --moec-threads is given")
    ap.add_argument("--moec-threads", type=int, default=None)
    ap.add_argument("--llama-search", choices=["probe", "every"], default="probe",
                    help="probe: llama.cpp's best setting per test from one short probe per type before its first "
                    "timing (decode: 16 tokens; prefill: the shortest prompt's winner for every length); every: "
                    "time every setting in every round and keep the best")
    ap.add_argument("--types", default=",".join(PAIRS))
    ap.add_argument("--activations", default="float32,int8", help="moec activation modes, one row each")
    ap.add_argument("--prompts", default="64,512", help="prefill prompt lengths")
    ap.add_argument("--no-mixed", action="store_true", help="skip the mixed plan vs uniform:8 table")
    ap.add_argument("--work", type=Path, default=None, help="where checkpoints, GGUF files and bundles are kept "
                    "(reused), one folder per model")
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1] / "reference/data/heldout.txt",
                    help="held-out text both engines are scored on")
    ap.add_argument("--ctx", type=int, default=256, help="llama-perplexity context (-c, -b); moec scores the "
                    "same chunks and positions")
    ap.add_argument("--chunks", type=int, default=-1, help="score only the first N chunks in both engines "
                    "(llama-perplexity --chunks N); -1: all")
    ap.add_argument("--gguf-base", choices=GGUF_BASES, default="bf16",
                    help="the GGUF llama-quantize reads for --olmoe (a real checkpoint always converts to f32, the "
                         "perplexity baseline): bf16 is exact for its bf16 weights; q8_0 (the converter's own Q8_0, the "
                         "other types requantized from it) when even a bf16 copy does not fit on disk (16 layers: 13.8 GB)")
    ap.add_argument("--no-quant-cache", action="store_true",
                    help="compile each bundle without the shared quantized-weight cache (it holds every plan's "
                         "quantized weights: ~10 GB for 16 OLMoE layers)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: speed, ppl")
    args = ap.parse_args()
    skip = set(args.skip.split(",")) - {""}
    work = args.work or Path(tempfile.mkdtemp(prefix="moec-peer-"))
    work.mkdir(parents=True, exist_ok=True)
    types = args.types.split(",")
    acts = args.activations.split(",")
    tests = ["decode"] + [f"pp{int(n)}" for n in args.prompts.split(",")]
    models = []
    if args.checkpoint is not None:
        models.append((f"{args.checkpoint.resolve().parent.name} ({args.checkpoint})", args.checkpoint, True))
    if args.olmoe:
        models.append((f"OLMoE-shaped, {args.olmoe} layers (random weights)", olmoe_checkpoint(work, args.olmoe),
                       False))
    if not models:
        ap.error("give a checkpoint and/or --olmoe LAYERS")
    for name, ckpt, real in models:
        out = work / ckpt.resolve().parent.name
        out.mkdir(exist_ok=True)
        ggufs = gguf_files(ckpt, args.llamacpp, out, types, args.gguf_base if not real else "f32")
        n_params = param_count(ckpt)
        print(f"\n## {name}: {n_params} parameters, files in {out}\n", flush=True)
        if "ppl" not in skip:
            if real:
                print_perplexity(args, ckpt, ggufs, n_params, out)
            else:
                print("perplexity: not measured (random weights: any perplexity of this model means nothing)\n")
        if "speed" in skip:
            continue
        bits = sorted({PAIRS[t] for t in types}, reverse=True)
        mixed = not args.no_mixed and 8 in bits
        bundles, share = build_bundles(ckpt, out, bits, acts, mixed, quant_cache=not args.no_quant_cache)
        moec, llama, loads = time_rounds(args, ggufs, bundles, tests)
        speed_tables(name, ggufs, bundles, moec, llama, loads, tests, acts, n_params, args.llamacpp, share)


if __name__ == "__main__":
    main()
