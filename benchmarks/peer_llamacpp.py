"""Side-by-side decode/prefill speed and size of moec and llama.cpp at matching bits, interleaved round by round.

Needs a llama.cpp build made by ``tools/setup_llamacpp.sh`` (outside the repo; nothing in the test
suite uses it). The checkpoint is converted with llama.cpp's own converter (to f32 GGUF; an
unrecognised BPE pre-tokenizer hash falls back to ``gpt-2``, see notes/llama-cpp-peer.md), then
quantized to each type; moec compiles the matching uniform plan for the host. Each round times
every pair (moec decode 64 steps / prefill 64 tokens, ``llama-bench -t THREADS -p 0 -n 64`` and
``-p 64 -n 0``, ``OMP_WAIT_POLICY=PASSIVE``); the table gives medians and medians of per-round ratios.

Usage::

    python benchmarks/peer_llamacpp.py reference/checkpoint --llamacpp /work/llamacpp [--rounds 3]
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

PAIRS = {"Q8_0": 8, "Q4_0": 4, "Q4_K_M": 4, "Q3_K_S": 3, "Q2_K": 2}
CONVERT = r'''
import runpy, sys
lc = sys.argv[1]
sys.path.insert(0, lc)
import conversion.base as base
orig = base.TextModel.get_vocab_base_pre
def pre(self, tokenizer):
    try:
        return orig(self, tokenizer)
    except NotImplementedError:
        return "gpt-2"
base.TextModel.get_vocab_base_pre = pre
sys.argv = [lc + "/convert_hf_to_gguf.py"] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def convert(ckpt: Path, root: Path, out: Path) -> Path:
    """HF checkpoint -> f32 GGUF with llama.cpp's converter (cached in ``out``)."""
    gguf = out / f"{ckpt.resolve().name}-f32.gguf"
    if not gguf.exists():
        lc = root / "src/vendor/llama.cpp"
        env = dict(os.environ, PYTHONPATH=f"{root / 'pydeps'}")
        subprocess.run([sys.executable, "-c", CONVERT, str(lc), str(ckpt), "--outtype", "f32",
                        "--outfile", str(gguf)], env=env, check=True)
    return gguf


def quantize(root: Path, f32: Path, qtype: str) -> Path:
    q = f32.with_name(f32.name.replace("-f32", f"-{qtype}"))
    if not q.exists():
        subprocess.run([str(root / "build/bin/llama-quantize"), str(f32), str(q), qtype], check=True,
                       capture_output=True)
    return q


def llama_bench(root: Path, gguf: Path, threads: int, prompt: int, gen: int) -> float:
    """tok/s from one llama-bench run (its mean over its own repetitions)."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    out = subprocess.run([str(root / "build/bin/llama-bench"), "-m", str(gguf), "-t", str(threads),
                          "-p", str(prompt), "-n", str(gen), "-r", "3", "-o", "jsonl"],
                         env=env, check=True, capture_output=True, text=True).stdout
    rows = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
    return float(rows[-1]["avg_ts"])


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


def param_count(ckpt: Path) -> int:
    from safetensors import safe_open
    with safe_open(str(ckpt / "model.safetensors"), "np") as f:
        total = 0
        for k in f.keys():
            shape = f.get_slice(k).get_shape()
            n = 1
            for d in shape:
                n *= d
            total += n
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--llamacpp", type=Path, default=Path("/work/llamacpp"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads; moec uses its default pool "
                    "choice unless --moec-threads is given")
    ap.add_argument("--moec-threads", type=int, default=None)
    ap.add_argument("--types", default=",".join(PAIRS))
    ap.add_argument("--work", type=Path, default=None, help="where GGUF files and bundles are kept (reused)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="moec-peer-"))
    work.mkdir(parents=True, exist_ok=True)
    types = args.types.split(",")
    f32 = convert(args.checkpoint, args.llamacpp, work)
    n_params = param_count(args.checkpoint)
    ggufs = {t: quantize(args.llamacpp, f32, t) for t in types}
    bundles = {b: moec_compile(args.checkpoint, b, work) for b in sorted({PAIRS[t] for t in types})}
    print(f"load average before: {os.getloadavg()}", flush=True)
    res: dict[str, list[tuple[float, float, float, float]]] = {t: [] for t in types}
    for r in range(args.rounds):
        for t in types:
            md, mp = moec_times(bundles[PAIRS[t]], args.moec_threads)
            ld = llama_bench(args.llamacpp, ggufs[t], args.threads, 0, 64)
            lp = llama_bench(args.llamacpp, ggufs[t], args.threads, 64, 0)
            res[t].append((md, mp, ld, lp))
            print(f"round {r} {t}: moec decode {md:.0f} prefill {mp:.0f} | llama.cpp decode {ld:.0f} "
                  f"prefill {lp:.0f} tok/s", flush=True)
    print(f"load average after: {os.getloadavg()}\n")
    print("| llama.cpp type | moec plan | llama.cpp MB (bpw) | moec MB (bpw) | decode tok/s llama.cpp / moec | "
          "moec/llama.cpp decode | prefill tok/s (64) llama.cpp / moec | moec/llama.cpp prefill |")
    print("|---|---|---|---|---|---|---|---|")
    med = statistics.median
    for t in types:
        bundle = bundles[PAIRS[t]]
        mbytes = json.loads((bundle / "manifest.json").read_text())["weight_bytes"]
        gbytes = ggufs[t].stat().st_size
        rows = res[t]
        print(f"| {t} | uniform:{PAIRS[t]} | {gbytes / 1e6:.2f} ({gbytes * 8 / n_params:.2f}) | "
              f"{mbytes / 1e6:.2f} ({mbytes * 8 / n_params:.2f}) | {med(x[2] for x in rows):.0f} / "
              f"{med(x[0] for x in rows):.0f} | {med(x[0] / x[2] for x in rows):.2f}x | "
              f"{med(x[3] for x in rows):.0f} / {med(x[1] for x in rows):.0f} | "
              f"{med(x[1] / x[3] for x in rows):.2f}x |")


if __name__ == "__main__":
    main()
