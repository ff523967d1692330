"""CUDA routed-expert GEMVs under variants of moec's GPU kernels, side by side.

Each stack (fixed 2/3/4/8-bit, and the nested 8-bit stack served at 2/3/4/8 bits) is built once per
variant of the TE form scheduled by ``gpu_rules.FusedGemv`` (``--vectors``: consecutive k per thread per
step, ``--rows``: output rows (warps) per thread block, ``--stage``) and of the hand-written kernel of
``schedules/cuda_gemv.py`` (``--hand``: run length, warps a block, rows a warp, conversion, word
assembly), and timed on ``tvm.cuda(0)``: µs per call, GB/s of the weight bytes the call reads, and that as
a share of the GPU's device-to-device copy bandwidth. Every variant's output is checked against the
stack's first variant's.

Two halves, like ``tools/gpu_check.py``: ``--prepare DIR --arch sm_XX`` compiles here (TVM compiler and
nvcc, no GPU), ``--from DIR`` times there with the TVM runtime alone; without either, one process does both.

Usage::

    python benchmarks/gpu_gemv_variants.py --prepare /tmp/v --arch sm_90 --shape dram,olmoe --vectors 4,8 \
        --rows 4 --stage 1 --hand v8r4p1c,v16r4p4c,v8r4p4c,v8r4p4cw
    python benchmarks/gpu_gemv_variants.py --from /tmp/v
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
import gpu_kernels  # noqa: E402

from moec.core.errors import MoecError  # noqa: E402


def prim_func(bits: int, nested: bool, n: int, k: int, experts: int, top_k: int, group: int):
    """The kernel's unscheduled PrimFunc ``main(x, weights…, [prec,] ids, y)``."""
    from tvm import te

    from moec.core.formats import get_nested_format
    from moec.lower.gpu_linear import expert_dequant_gemv, expert_nested_gemv
    groups = k // group
    x = te.placeholder((1, k), "float32", "x")
    scale = te.placeholder((experts, n, groups), "float16", "scale")
    zero = te.placeholder((experts, n, gpu_kernels._zero_bytes(k, group, bits)), "uint8", "zero")
    ids = te.placeholder((top_k,), "int32", "ids")
    if nested:
        segs = [te.placeholder((experts, n, k * b // 8), "uint8", f"seg{i}")
                for i, b in enumerate(get_nested_format(bits).segment_bits)]
        prec = te.placeholder((experts,), "int32", "prec")
        y = expert_nested_gemv(x, *segs, scale, zero, prec, ids, storage_bits=bits, n=n, k=k, group=group)
        args = [x, *segs, scale, zero, prec, ids, y]
    else:
        packed = te.placeholder((experts, n, k * bits // 8), "uint8", "packed")
        y = expert_dequant_gemv(x, packed, scale, zero, ids, bits, n, k, group)
        args = [x, packed, scale, zero, ids, y]
    return te.create_prim_func(args).with_attr("global_symbol", "main")


def parse_hand(spec: str) -> dict:
    """``v8r4p2m``: runs of 8, 4 warps a block, 2 rows a warp, magic conversion (``c``: convert instruction;
    ``i``: the int8-activation bodies, nested stacks in the run layout where they read runs of 32); a trailing
    ``w``: nested widths of two or more segments assemble codes by words (float32 bodies)."""
    m = re.fullmatch(r"v(\d+)r(\d+)p(\d+)([mci])(w?)", spec)
    if m is None:
        raise SystemExit(f"error: hand variant {spec!r} is not like v8r4p2m, v8r4p2cw or v32r4p4i")
    if m[4] == "i":
        return {"vector": int(m[1]), "rows": int(m[2]), "per_warp": int(m[3]), "activations": "int8", "words": False}
    return {"vector": int(m[1]), "rows": int(m[2]), "per_warp": int(m[3]), "magic": m[4] == "m", "words": m[5] == "w"}


STACKS = [(2, False), (3, False), (4, False), (8, False), (8, True)]


def prepare(folder: Path, arch: str, shapes: list[str], vectors: list[int], rows: list[int], stages: list[bool],
            hand: list[str] = ("v8r4p1c",)) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for shape in shapes:
        out += prepare_shape(folder, arch, shape, vectors, rows, stages, hand)
    (folder / "variants.json").write_text(json.dumps(out, indent=1))
    return out


def prepare_shape(folder: Path, arch: str, shape: str, vectors: list[int], rows: list[int], stages: list[bool],
                  hand: list[str]) -> list[dict]:
    """Every variant of every stack at one shape, grouped by stack (one upload each when measured): the
    FusedGemv grid first (the first is the reference of the equality column), then the hand-written kernel
    (``schedules/cuda_gemv.py``) per ``hand`` spec, for the nested stack and the fixed ones."""
    import tvm

    from moec.core.targets import load_target
    from moec.lower.schedules.cuda_gemv import cuda_fixed_gemv, cuda_nested_gemv
    from moec.lower.schedules.gpu_rules import FusedGemv
    target = load_target(f"cuda:{arch}").tvm()
    sh = gpu_kernels.SHAPES[shape]
    out = []
    for (bits, nested), vector, r, stage in itertools.product(STACKS, vectors, rows, stages):
        if sh["k"] % (32 * vector):
            continue
        name = f"{shape}-{'n' if nested else 'f'}{bits}-v{vector}-r{r}" + ("-s" if stage else "")
        t0 = time.time()
        with target:
            sch = FusedGemv(vector=vector, rows=r, stage=stage).apply(prim_func(bits, nested, **sh), target, False)
            lib = tvm.compile(tvm.IRModule({"main": sch.mod["main"]}), target=target)
        out.append({"name": name, "bits": bits, "nested": nested, "vector": vector, "rows": r, "stage": stage,
                    "shape": shape, "arch": gpu_kernels.export(lib, target, folder, name)})
        print(f"built {name} ({time.time() - t0:.1f} s)", file=sys.stderr, flush=True)
    for (bits, nested), spec in itertools.product(STACKS, hand):  # the hand-written kernels
        p = parse_hand(spec)
        if not nested and p.pop("words"):  # fixed stacks have one segment: the same kernel
            continue
        make = cuda_nested_gemv if nested else cuda_fixed_gemv
        acts = p.get("activations", "float32")
        laid = gpu_kernels.run_layout(bits, sh["n"], sh["k"], sh["group"], acts, nested) and p["vector"] == 32
        if laid:
            p["run_layout"] = True
        try:
            func = make(bits, sh["n"], sh["k"], sh["experts"], sh["top_k"], sh["group"], 1, **p)
        except MoecError:
            continue
        name = f"{shape}-h{'n' if nested else 'f'}{bits}-{spec}"
        t0 = time.time()
        with target:
            lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
        out.append({"name": name, "bits": bits, "nested": nested, "vector": p["vector"], "rows": p["rows"],
                    "stage": "hand", "spec": spec, "shape": shape, "activations": acts, "run_layout": laid,
                    "arch": gpu_kernels.export(lib, target, folder, name)})
        print(f"built {name} ({time.time() - t0:.1f} s)", file=sys.stderr, flush=True)
    order = {stack: i for i, stack in enumerate(STACKS)}
    return sorted(out, key=lambda v: order[(v["bits"], v["nested"])])  # stable: grid first within a stack


def measure(folder: Path, variants: list[dict], widths: list[int]) -> list[list[str]]:
    import tvm

    from moec.runtime.tvm_runtime import use_bundle_kernels
    from gpu_check import copy_bandwidth_gbs
    dev = tvm.runtime.cuda(0)
    copy = copy_bandwidth_gbs()[0]
    rows, ref, inputs_for = [], {}, {}
    for v in variants:
        sh = gpu_kernels.SHAPES[v["shape"]]
        use_bundle_kernels((folder / f"{v['name']}.cu").read_bytes(), (folder / f"{v['name']}.fatbin").read_bytes(),
                           v["arch"], dev)
        lib = tvm.runtime.load_module(str(folder / f"{v['name']}.so"))
        f = lib["main"]
        acts = v.get("activations", "float32")
        key = (v["shape"], v["bits"], v["nested"], v.get("run_layout", False))
        if key not in inputs_for:
            inputs_for.clear()
            arrays = gpu_kernels.inputs(v["bits"], **sh, width=8 if v["nested"] else None,
                                        activations="int8" if key[3] else "float32")  # laid out in runs or not
            inputs_for[key] = [tvm.runtime.tensor(a, dev) for a in arrays]
        for width in (widths if v["nested"] else [None]):
            args = list(inputs_for[key])
            if width is not None:
                args[-2] = tvm.runtime.tensor(np.full(sh["experts"], width, np.int32), dev)
            y = tvm.runtime.empty((sh["top_k"], sh["n"]), "float32", dev)
            f(*args, y)
            got = y.numpy()
            label = f"{v['bits']}-bit" if width is None else f"nested8@{width}"
            key_ref = (v["shape"], label)
            want = ref.setdefault(key_ref, got)
            tol = 3e-2 if acts == "int8" else 1e-3  # int8 activations: the activation rounding, not the kernel
            ok = np.allclose(got, want, rtol=tol, atol=tol * float(np.abs(want).max()))
            secs = min(lib.time_evaluator("main", dev, number=20, repeat=10)(*args, y).results)
            case = {"shape": v["shape"], "bits": v["bits"], "width": width}
            gbs = gpu_kernels.case_bytes(case) / secs / 1e9
            kind = f"hand {v['spec']}" if v["stage"] == "hand" else (
                f"v{v['vector']} r{v['rows']}" + (" staged" if v["stage"] else ""))
            rows.append([f"{v['shape']} {label}", kind, f"{secs * 1e6:.1f}", f"{gbs:.0f}",
                         f"{100 * gbs / copy:.1f} %", "yes" if ok else "NO"])
            print(" | ".join(rows[-1]), flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepare", type=Path, metavar="DIR")
    ap.add_argument("--from", dest="prepared", type=Path, metavar="DIR")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--shape", default="dram", help=f"comma list of {', '.join(sorted(gpu_kernels.SHAPES))}")
    ap.add_argument("--vectors", default="4,8,16,32,64")
    ap.add_argument("--rows", default="2,4,8")
    ap.add_argument("--stage", default="0,1", help="1: vector loads into registers (FusedGemv stage), 0: not")
    ap.add_argument("--widths", default="2,3,4,8", help="run-time widths of the nested stack")
    ap.add_argument("--hand", default="v8r4p1c,v8r4p2c,v8r4p4c,v8r4p2cw,v8r4p4cw",
                    help="hand-written kernel variants, nested and fixed: v<run>r<warps a block>p<rows a warp>"
                         "<m: magic-number conversion, c: convert instruction, i: int8 activations (dp4a)>"
                         "[w: nested codes by words] "
                         "('' for none)")
    args = ap.parse_args()
    folder = args.prepared or args.prepare or Path("/tmp/gpu-gemv-variants")
    if args.prepared is None:
        shapes = args.shape.split(",")
        if any(s not in gpu_kernels.SHAPES for s in shapes):
            ap.error(f"--shape: one of {', '.join(sorted(gpu_kernels.SHAPES))}")
        variants = prepare(folder, args.arch, shapes, [int(v) for v in args.vectors.split(",") if v],
                           [int(r) for r in args.rows.split(",")], [s == "1" for s in args.stage.split(",")],
                           [h for h in args.hand.split(",") if h])
        if args.prepare is not None:
            return 0
    else:
        variants = json.loads((folder / "variants.json").read_text())
    from moec.cli.table import format_table
    rows = measure(folder, variants, [int(w) for w in args.widths.split(",")])
    print(format_table(["kernel", "variant", "us/call", "GB/s", "of copy", "= first"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
