"""End-to-end memory and time of moec on a random OLMoE-1B-7B-shaped checkpoint: every stage, peak RSS per stage.

Writes (or reuses) a bf16 sharded checkpoint with HF ``OlmoeForCausalLM`` names under ``--work``,
then runs the real CLI, each stage in its own process, sampling the resident set of the whole
process tree every 0.1 s: ``moec profile`` (routing + proxy sensitivity), ``moec search``
(greedy, 90 % of the uniform:4 size), ``moec compile --target host`` (uniform:4 rtn and the
searched plan), ``moec run``, ``moec export`` (uniform:4 rtn) and an onnxruntime greedy decode
(decode graph only) whose 16 tokens must equal the TVM bundle's. ``--compile-layers 4,8,16``
adds uniform:4 compiles at other depths (flatness of compile memory in the number of layers).

    python benchmarks/scale.py --layers 4 --work /work/bench-data
    python benchmarks/scale.py --layers 16 --compile-layers 4,8 --work /work/bench-data
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peak_rss import PeakRss  # noqa: E402
from scale_checkpoint import write_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CALIB = REPO / "reference" / "data" / "calib.txt"
PROMPT = "def main():"
GB = 1 << 30


def run_stage(label: str, argv: list[str], rows: list[dict], log: Path) -> subprocess.CompletedProcess:
    """Run ``argv`` sampling its process tree's RSS; appends {stage, seconds, peak_rss} to ``rows``."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TVM_NUM_THREADS": "2", "OMP_NUM_THREADS": "2"}
    t0 = time.time()
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(argv)}\n")
        out.flush()
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        with PeakRss(proc.pid) as peak:
            rc = proc.wait()
    row = {"stage": label, "seconds": round(time.time() - t0, 1), "peak_rss_gb": round(peak.peak / GB, 2), "rc": rc}
    rows.append(row)
    print(f"  {label:<34} {row['seconds']:8.1f} s  {row['peak_rss_gb']:6.2f} GB  rc={rc}", flush=True)
    if rc != 0:
        tail = log.read_text().strip().splitlines()[-3:]
        print("    " + "\n    ".join(tail), flush=True)
    return proc


def checkpoint(work: Path, layers: int) -> Path:
    root = work / f"olmoe-l{layers}"
    if not (root / "model.safetensors.index.json").is_file():
        t0 = time.time()
        write_checkpoint(root, layers, text=CALIB.read_text()[:300_000])
        print(f"  wrote {root} ({sum(f.stat().st_size for f in root.iterdir()) / 1e9:.1f} GB) "
              f"in {time.time() - t0:.0f} s", flush=True)
    return root


def moec(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from moec.cli.main import main; sys.argv[0] = 'moec'; main()", *args]


def budget_mb(ckpt: Path, fraction: float) -> float:
    sys.path.insert(0, str(REPO))
    from moec.models.checkpoint import load_config
    from moec.quant.accounting import plan_memory, shape_model
    from moec.core.plan import uniform_plan
    cfg = load_config(ckpt)
    return round(fraction * plan_memory(shape_model(cfg), uniform_plan(cfg, 4, 64)).total / 1e6, 1)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4, help="Decoder layers of the main run [4; OLMoE has 16].")
    ap.add_argument("--compile-layers", default="", help="Extra uniform:4 compiles at these depths, e.g. 8,16.")
    ap.add_argument("--work", type=Path, default=Path("/work/bench-data"))
    ap.add_argument("--max-memory-gb", type=float, default=6.0)
    ap.add_argument("--calib-tokens", type=int, default=2048)
    ap.add_argument("--bits", default="2,4", help="Bit-widths the profile's proxy sensitivity measures [2,4].")
    ap.add_argument("--skip", default="", help="Comma-separated stages to skip: profile,search,compile,mixed,run,export.")
    ap.add_argument("--tag", default="", help="Suffix of the result file (scale{TAG}.json) for runs in parallel.")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    log = work / f"scale{args.tag}.log"
    mem = ["--max-memory-gb", str(args.max_memory_gb)]
    print(f"load average before: {os.getloadavg()}; available memory {psutil.virtual_memory().available / GB:.1f} GB")
    rows: list[dict] = []
    ck = checkpoint(work, args.layers)
    out = work / f"out-l{args.layers}"
    out.mkdir(exist_ok=True)
    if "profile" not in skip:
        run_stage(f"profile L={args.layers}", moec("profile", str(ck), "--data", str(CALIB), "--seq-len", "128",
                  "--max-tokens", str(args.calib_tokens), "--sensitivity", "proxy", "--bits", args.bits,
                  "--out", str(out / "profile.json"), *mem), rows, log)
    if "search" not in skip:
        run_stage(f"search L={args.layers}", moec("search", str(ck), "--profile", str(out / "profile.json"),
                  "--target", "host", "--budget-mb", str(budget_mb(ck, 0.9)), "--policy", "greedy",
                  "--out", str(out / "plan.json")), rows, log)
    if "compile" not in skip:
        run_stage(f"compile uniform:4 rtn L={args.layers}", moec("compile", str(ck), "--target", "host", "--plan",
                  "uniform:4", "--method", "rtn", "--out", str(out / "bundle-u4"), *mem), rows, log)
    if "mixed" not in skip and (out / "plan.json").is_file():
        run_stage(f"compile searched plan L={args.layers}", moec("compile", str(ck), "--target", "host", "--plan",
                  str(out / "plan.json"), "--out", str(out / "bundle-mixed"), *mem), rows, log)
    if "run" not in skip:
        run_stage(f"run uniform:4 L={args.layers}", moec("run", str(out / "bundle-u4"), "--prompt", PROMPT,
                  "--max-new-tokens", "16"), rows, log)
    if "export" not in skip:
        run_stage(f"export uniform:4 L={args.layers}", moec("export", str(ck), "--plan", "uniform:4", "--method", "rtn",
                  "--out", str(out / "onnx-u4"), *mem), rows, log)
        cmp = [sys.executable, str(Path(__file__).resolve().parent / "scale_tokens.py"), str(out / "onnx-u4"),
               str(out / "bundle-u4"), PROMPT, "16", str(out / "tokens.json")]
        run_stage(f"onnxruntime decode L={args.layers}", cmp[:2] + ["ort", *cmp[2:]], rows, log)
        run_stage(f"TVM bundle decode L={args.layers}", cmp[:2] + ["tvm", *cmp[2:]], rows, log)
    for layers in filter(None, args.compile_layers.split(",")):
        ckl = checkpoint(work, int(layers))
        run_stage(f"compile uniform:4 rtn L={layers}", moec("compile", str(ckl), "--target", "host", "--plan",
                  "uniform:4", "--method", "rtn", "--out", str(work / f"out-l{layers}" / "bundle-u4"), *mem), rows, log)
    packed = None
    mf = out / "bundle-u4" / "manifest.json"
    if mf.is_file():
        packed = json.loads(mf.read_text())["files"]["weights.bin"]["bytes"]
    tokens = json.loads((out / "tokens.json").read_text()) if (out / "tokens.json").is_file() else {}
    print(f"\nload average after: {os.getloadavg()}")
    print(f"\n| stage | wall s | peak RSS GB (process tree) |\n|---|---|---|")
    for r in rows:
        print(f"| {r['stage']}{'' if r['rc'] == 0 else ' (FAILED)'} | {r['seconds']} | {r['peak_rss_gb']} |")
    if packed:
        print(f"\npacked uniform:4 weights.bin: {packed / GB:.2f} GB")
    if tokens:
        same = tokens.get("ort") == tokens.get("tvm")
        print(f"greedy tokens onnxruntime == TVM for {len(tokens.get('ort', []))} tokens: {same}")
    (out / f"scale{args.tag}.json").write_text(json.dumps({"rows": rows, "packed_bytes": packed, "tokens": tokens}, indent=2))


if __name__ == "__main__":
    main()
