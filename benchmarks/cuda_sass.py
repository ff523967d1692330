"""The CUDA decode GEMVs' machine code without a GPU: SASS instructions a weight, float32 and int8 bodies side by side.

Each routed-expert GEMV of ``schedules/cuda_gemv.py`` (fixed 2/3/4/8-bit stacks; the nested 8-bit stack
specialised to one run-time width, so its loop is that width's) is built for ``--arch`` with TVM and nvcc and
disassembled with ``cuobjdump -sass`` (``pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm`` puts both
tools it runs in site-packages). For
the main loop (the backward branch whose body holds the dot products: one lane step of a warp's rows) it
prints instructions per weight, the int8 bodies' prologue (quantizing the block's activation row, up to the
first barrier) spread over the weights a thread serves, and instructions per byte of weights read.

Where a GEMV issues more instructions per byte than the GPU retires while its memory streams one, it is
bound by instructions, not bytes. ``modelled`` is ``min(0.96, B / (instructions per byte))`` of the copy
bandwidth, ``B`` = 5.6: the fit to session 20's H200 measurements of the float32 bodies at DRAM size
(29 / 37 / 57 / 96 % of the copy bandwidth fixed, 29 / 32 / 37 / 67 % nested at 2 / 3 / 4 / 8 bits; each
gives ``B`` between 5.3 and 6.0 with this script's counts). A model of one GPU, not a measurement: the int8
rows' figures are what ``benchmarks/gpu_gemv_variants.py`` times on a GPU.

Usage::

    python benchmarks/cuda_sass.py                      # DRAM-size shape (32 experts of [4096, 4096]), sm_90
    python benchmarks/cuda_sass.py --arch sm_87 --shape olmoe
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

BALANCE = 5.6  # instructions a byte the H200 issued while streaming at the copy bandwidth (see above)
# A Jetson AGX Orin issues more a byte (16 SMs at 1.3 GHz over 205 GB/s: ~13 a byte at peak against the H200's
# ~8), so with the H200's balance the sm_87 rows' modelled shares are conservative.
MEASURED_H200 = {("fixed", 2): 29.0, ("fixed", 3): 36.9, ("fixed", 4): 57.3, ("fixed", 8): 96.2,
                 ("nested", 2): 29.1, ("nested", 3): 31.7, ("nested", 4): 36.9, ("nested", 8): 67.1}  # session 20, %


def find_cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    for base in (sysconfig.get_paths()["purelib"], *sys.path):
        for sub in ("nvidia/cu13/bin/cuobjdump", "nvidia/cuda_cuobjdump/bin/cuobjdump"):
            path = Path(base) / sub
            if path.is_file():
                return str(path)
    return None


def sass(func, arch: str, nvcc: str, cuobjdump: str) -> list[str]:
    """The instruction lines of ``func`` compiled for ``arch``."""
    import tvm

    from moec.lower.cuda_kernels import cuda_source
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                      target=tvm.target.Target({"kind": "cuda", "arch": arch}, host="llvm"))
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "k.cu").write_text(cuda_source(lib.mod))
        subprocess.run([nvcc, "-cubin", f"-arch={arch}", "-O3", "-o", f"{d}/k.cubin", f"{d}/k.cu"], check=True,
                       capture_output=True)
        out = subprocess.run([cuobjdump, "-sass", f"{d}/k.cubin"], check=True, capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/\s+\S", line)]


def _address(line: str) -> int:
    return int(re.match(r"\s+/\*([0-9a-f]{4})\*/", line).group(1), 16)


def main_loop(ins: list[str]) -> list[str]:
    """The body of the backward branch holding the most dot-product instructions (IDP4A, else FFMA)."""
    addrs = [_address(line) for line in ins]
    best, best_score = [], (-1, -1)
    for i, line in enumerate(ins):
        m = re.search(r"BRA\s+0x([0-9a-f]+)", line)
        if m and int(m.group(1), 16) < addrs[i] and int(m.group(1), 16) in addrs:
            body = ins[addrs.index(int(m.group(1), 16)):i + 1]
            score = (sum("IDP" in b for b in body), sum("FFMA" in b for b in body))
            if score > best_score:
                best, best_score = body, score
    return best


def count(func, arch: str, nvcc: str, cuobjdump: str, weights_a_step: int, steps_a_thread: int) -> dict:
    """Loop instructions and instructions a weight; where nvcc unrolled every lane step (no loop left), the
    whole kernel's instructions over the weights a thread serves."""
    ins = sass(func, arch, nvcc, cuobjdump)
    loop = main_loop(ins)
    if not loop:
        return {"loop": "unrolled", "per_weight": len(ins) / (weights_a_step * steps_a_thread)}
    barrier = next((i for i, line in enumerate(ins) if "BAR.SYNC" in line), 0)
    per_weight = len(loop) / weights_a_step + barrier / (weights_a_step * steps_a_thread)
    return {"loop": len(loop), "per_weight": per_weight}


def rows_for(shape: dict, arch: str, nvcc: str, cuobjdump: str, widths: list[int]) -> list[list[str]]:
    from moec.lower.schedules import cuda_gemv as cg
    from moec.lower.schedules import cuda_gemv_int8 as ci
    n, k, experts, top_k, group = (shape[a] for a in ("n", "k", "experts", "top_k", "group"))
    full = cg.nested_codes(8)
    out = []
    for width in widths:
        for kind in ("fixed", "nested"):
            res = {}
            for acts in ("float32", "int8"):
                if kind == "fixed":
                    laid = acts == "int8" and ci.run_layout_fits(width, n, k, group, nested=False)  # as the emitter
                    func = cg.cuda_fixed_gemv(width, n, k, experts, top_k, group, 1, activations=acts, run_layout=laid)
                    vector = (ci.FIXED_VECTOR if acts == "int8" else cg.FIXED_VECTOR)[width]
                    tiles = 1
                else:  # the nested stack with one width, so the loop counted is that width's
                    d = full.widths.index(width)
                    one = cg.Codes(full.segb, full.positions, (width,), (full.used[d],), full.storage)
                    vector = ci.NESTED_VECTOR if acts == "int8" else 8
                    macro = cg._make_kernel(one, n, k, top_k, group, 1, vector, 4, None, False, True, True, False,
                                            acts, acts == "int8")
                    func = _nested_func(macro, n, k, experts, top_k, group)
                    tiles = 1
                if acts == "int8":
                    tiles = ci.block_tiles(top_k * (n // 16), n // 16)
                steps = k // (32 * vector) * tiles
                res[acts] = count(func, arch, nvcc, cuobjdump, 4 * vector, steps)
            read = width / 8 + (2 + (8 if kind == "nested" else width) / 8) / group  # codes, fp16 scale, zero
            line = [f"{kind} {width}-bit" if kind == "fixed" else f"nested8@{width}"]
            for acts in ("float32", "int8"):
                r = res[acts]
                ipb = r["per_weight"] / read
                line += [f"{r['loop']}", f"{r['per_weight']:.2f}", f"{ipb:.1f}",
                         f"{100 * min(0.96, BALANCE / ipb):.0f} %"]
            line.append(f"{MEASURED_H200[(kind, width)]:.0f} %" if shape.get("name") == "dram" else "")
            line.append(f"{res['float32']['per_weight'] / res['int8']['per_weight']:.2f}x")
            out.append(line)
            print(" | ".join(line), file=sys.stderr, flush=True)
    return out


def _nested_func(macro, n: int, k: int, experts: int, top_k: int, group: int):
    """``main(x, seg0…3, scale, zero, prec, ids, y)`` over ``macro`` (the 8-bit nested stack's buffers)."""
    from tvm.script import tirx as T

    from moec.quant.pack import packed_row_bytes
    zb, groups = packed_row_bytes(k // group, 8), k // group

    @T.prim_func
    def main(x: T.Buffer((1, k), "float32"), seg0: T.Buffer((experts, n, k // 4), "uint8"),
             seg1: T.Buffer((experts, n, k // 8), "uint8"), seg2: T.Buffer((experts, n, k // 8), "uint8"),
             seg3: T.Buffer((experts, n, k // 2), "uint8"), scale: T.Buffer((experts, n, groups), "float16"),
             zero: T.Buffer((experts, n, zb), "uint8"), prec: T.Buffer((experts,), "int32"),
             ids: T.Buffer((top_k,), "int32"), y: T.Buffer((top_k, n), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        macro(x, [seg0, seg1, seg2, seg3], [scale], [zero], prec, ids, y)
    return main


def main() -> int:
    import gpu_kernels

    from moec.cli.table import format_table
    from moec.lower.cuda_kernels import find_nvcc
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="sm_90", help="sm_90 (H100/H200: the model's calibration), sm_87 (Jetson Orin)")
    ap.add_argument("--shape", default="dram", choices=sorted(gpu_kernels.SHAPES))
    ap.add_argument("--widths", default="2,3,4,8")
    args = ap.parse_args()
    nvcc, cuobjdump = find_nvcc(), find_cuobjdump()
    if nvcc is None or cuobjdump is None:
        print("error: needs nvcc and cuobjdump (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)",
              file=sys.stderr)
        return 2
    try:
        widths = [int(w) for w in args.widths.split(",")]
    except ValueError:
        widths = []
    if not widths or any(w not in (2, 3, 4, 8) for w in widths):
        print("error: --widths takes a comma list of 2, 3, 4 and 8", file=sys.stderr)
        return 2
    shape = {**gpu_kernels.SHAPES[args.shape], "name": args.shape}
    try:
        rows = rows_for(shape, args.arch, nvcc, cuobjdump, widths)
    except subprocess.CalledProcessError as exc:  # nvcc refused the arch, or cuobjdump the cubin
        said = (exc.stderr or b"").decode(errors="replace").strip().splitlines()
        print(f"error: {Path(exc.cmd[0]).name} failed for --arch {args.arch}: {said[-1] if said else exc}",
              file=sys.stderr)
        return 2
    print(f"CUDA GEMV SASS ({args.arch}, shape {args.shape}: {shape['experts']} experts of [{shape['n']}, "
          f"{shape['k']}], top {shape['top_k']}); per weight: main loop plus the int8 prologue's share; modelled: "
          f"min(0.96, {BALANCE} / instructions a byte) of the copy bandwidth")
    head = ["stack", "f32 loop", "f32 /weight", "f32 /byte", "f32 modelled", "int8 loop", "int8 /weight",
            "int8 /byte", "int8 modelled", "f32 measured (H200, s20)", "f32/int8 instr"]
    print(format_table(head, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
