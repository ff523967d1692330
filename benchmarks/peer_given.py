"""Given moec bundles against given llama.cpp GGUF files, decode and prefill, interleaved round by round.

``peer_llamacpp.py`` compiles one float32-activation bundle per type; this times bundles you built
(``moec compile --activations int8``, another checkout's bundles) against the GGUF files it left in
its ``--work`` folder, with the same timing: moec decodes 64 steps after a 16-token prompt and
prefills a 64-token prompt at the session's default thread choice (:func:`peer_speed.moec_times`,
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
         "t = moec_times(sys.argv[1], [64], None, 1); print(json.dumps([t['decode'], t['pp64']]))")


def moec_row(bundle: str, checkout: str) -> tuple[float, float]:
    """(decode, prefill) tok/s of ``bundle`` timed by ``checkout``'s runtime in a fresh process."""
    env = dict(os.environ, PYTHONPATH=checkout)
    out = subprocess.run([sys.executable, "-c", CHILD, bundle, str(HERE / "benchmarks")], env=env, check=True,
                         capture_output=True, text=True).stdout
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
    args = ap.parse_args()
    rows = [parse_row(r) for r in args.row]
    types = sorted({r[0] for r in rows})
    ggufs = {t: args.gguf_dir / f"checkpoint-{t}.gguf" for t in types}
    for t, g in ggufs.items():
        if not g.exists():
            raise SystemExit(f"no {g} (run peer_llamacpp.py --work {args.gguf_dir} first)")
    print(f"load average before: {os.getloadavg()}", flush=True)
    llama: dict[str, list[tuple[float, float]]] = {t: [] for t in types}
    moec: dict[tuple[str, str], list[tuple[float, float]]] = {(r[0], r[1]): [] for r in rows}
    for rnd in range(args.rounds):
        for t in types:
            best, won = llama_times(args.llamacpp, ggufs[t], ["decode", "pp64"], settings(args.threads), 1)
            ld, lp = best["decode"], best["pp64"]
            llama[t].append((ld, lp))
            print(f"round {rnd} llama.cpp {t}: decode {ld:.0f} ({label(won['decode'])}) "
                  f"prefill {lp:.0f} ({label(won['pp64'])}) tok/s", flush=True)
            for kind, label, bundle, checkout in rows:
                if kind == t:
                    md, mp = moec_row(bundle, checkout)
                    moec[(kind, label)].append((md, mp))
                    print(f"round {rnd} moec {label}: decode {md:.0f} prefill {mp:.0f} tok/s", flush=True)
    print(f"load average after: {os.getloadavg()}\n")
    med = statistics.median
    print("| llama.cpp type | moec bundle | decode tok/s llama.cpp / moec | moec/llama.cpp decode | "
          "prefill tok/s (64) llama.cpp / moec | moec/llama.cpp prefill |")
    print("|---|---|---|---|---|---|")
    for kind, label, _, _ in rows:
        ll, mm = llama[kind], moec[(kind, label)]
        print(f"| {kind} | {label} | {med(x[0] for x in ll):.0f} / {med(x[0] for x in mm):.0f} | "
              f"{med(m[0] / l[0] for l, m in zip(ll, mm)):.2f}x | {med(x[1] for x in ll):.0f} / "
              f"{med(x[1] for x in mm):.0f} | {med(m[1] / l[1] for l, m in zip(ll, mm)):.2f}x |")


if __name__ == "__main__":
    main()
