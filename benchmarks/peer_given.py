"""Given moec bundles against given llama.cpp GGUF files, decode and prefill, interleaved round by round.

``peer_llamacpp.py`` compiles one float32-activation bundle per type; this times bundles you built
(``moec compile --activations int8``, another checkout's bundles) against the GGUF files it left in
its ``--work`` folder, with the same timing: moec decodes 64 steps after a 16-token prompt and
prefills a 64-token prompt (``--prompts 64,512``: each length) at the session's default thread choice (:func:`peer_speed.moec_times`,
each bundle in a fresh process whose ``PYTHONPATH`` is the checkout named with it, so an old
runtime times its own bundle); llama.cpp at its best of ``-t 1`` and ``-t THREADS`` with either
OpenMP wait policy (:func:`peer_speed.llama_times` over :func:`peer_speed.settings`). Every round times every row; the table gives
medians and medians of per-round ratios.

Usage::

    python benchmarks/peer_given.py --llamacpp /work/llamacpp --rounds 3 \\
        --row Q4_0:uniform:4=/tmp/b/u4 --row Q4_0:uniform:4-int8=/tmp/b/u4i8 \\
        --row Q4_0:main-uniform:4=/tmp/b/main-u4@/work/main --gguf-dir /work/bench-data/peer

``--row TYPE:LABEL=BUNDLE[@CHECKOUT]``: time ``BUNDLE`` (with the runtime of ``CHECKOUT``, default
this one) against ``GGUF_DIR/checkpoint-TYPE.gguf``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_speed import label, llama_times, settings  # noqa: E402

HERE = Path(__file__).resolve().parents[1]
CHILD = ("import json, sys; sys.path.insert(0, sys.argv[2]); from peer_speed import moec_times; "
         "p = json.loads(sys.argv[3]); t = moec_times(sys.argv[1], p, None, int(sys.argv[4])); "
         "print(json.dumps([t['decode']] + [t[f'pp{n}'] for n in p]))")


def moec_row(bundle: str, checkout: str, prompts: list[int], reps: int) -> tuple[float, ...]:
    """(decode, prefill per prompt length) tok/s of ``bundle`` timed by ``checkout``'s runtime in a fresh
    process (means over ``reps`` runs)."""
    env = dict(os.environ, PYTHONPATH=checkout)
    out = subprocess.run([sys.executable, "-c", CHILD, bundle, str(HERE / "benchmarks"), json.dumps(prompts),
                          str(reps)], env=env, check=True, capture_output=True, text=True).stdout
    return tuple(json.loads(out.strip().splitlines()[-1]))


def parse_row(text: str) -> tuple[str, str, str, str]:
    head, _, target = text.partition("=")
    kind, _, label = head.partition(":")
    bundle, _, checkout = target.partition("@")
    if not (kind and label and bundle):
        raise SystemExit(f"--row wants TYPE:LABEL=BUNDLE[@CHECKOUT], got {text!r}")
    return kind, label, bundle, checkout or str(HERE)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llamacpp", type=Path, default=Path("/work/llamacpp"))
    ap.add_argument("--gguf-dir", type=Path, required=True, help="peer_llamacpp.py's --work folder")
    ap.add_argument("--row", action="append", required=True, help="TYPE:LABEL=BUNDLE[@CHECKOUT]")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp's most threads (best of 1..this)")
    ap.add_argument("--prompts", default="64", help="prompt lengths of the prefill tests, e.g. 64,512")
    ap.add_argument("--reps", type=int, default=1, help="runs per test and round (llama-bench -r, moec's mean)")
    args = ap.parse_args()
    prompts = [int(n) for n in args.prompts.split(",")]
    tests = ["decode"] + [f"pp{n}" for n in prompts]
    rows = [parse_row(r) for r in args.row]
    types = sorted({r[0] for r in rows})
    ggufs = {t: args.gguf_dir / f"checkpoint-{t}.gguf" for t in types}
    for t, g in ggufs.items():
        if not g.exists():
            raise SystemExit(f"no {g} (run peer_llamacpp.py --work {args.gguf_dir} first)")
    print(f"load average before: {os.getloadavg()}", flush=True)
    llama: dict[str, list[tuple[float, ...]]] = {t: [] for t in types}
    moec: dict[tuple[str, str], list[tuple[float, ...]]] = {(r[0], r[1]): [] for r in rows}
    for rnd in range(args.rounds):
        for t in types:
            best, won = llama_times(args.llamacpp, ggufs[t], tests, settings(args.threads), args.reps)
            llama[t].append(tuple(best[x] for x in tests))
            print(f"round {rnd} llama.cpp {t}: " + ", ".join(f"{x} {best[x]:.0f} ({label(won[x])})" for x in tests)
                  + " tok/s", flush=True)
            for kind, name, bundle, checkout in rows:
                if kind == t:
                    m = moec_row(bundle, checkout, prompts, args.reps)
                    moec[(kind, name)].append(m)
                    print(f"round {rnd} moec {name}: " + ", ".join(f"{x} {v:.0f}" for x, v in zip(tests, m))
                          + " tok/s", flush=True)
    print(f"load average after: {os.getloadavg()}\n")
    med = statistics.median
    heads = ["decode"] + [f"prefill ({n})" for n in prompts]
    print("| llama.cpp type | moec bundle | " + " | ".join(f"{h} tok/s llama.cpp / moec | moec/llama.cpp {h}"
                                                        for h in heads) + " |")
    print("|---|---|" + "---|---|" * len(heads))
    for kind, name, _, _ in rows:
        ll, mm = llama[kind], moec[(kind, name)]
        cells = [f"{med(x[i] for x in ll):.0f} / {med(x[i] for x in mm):.0f} | "
                 f"{med(m[i] / l[i] for l, m in zip(ll, mm)):.2f}x" for i in range(len(tests))]
        print(f"| {kind} | {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
