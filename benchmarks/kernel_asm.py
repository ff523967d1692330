"""Static instruction counts of the ARM dotprod decode GEMVs, fixed and nested, from their aarch64 assembly.

No ARM hardware is reachable from this project's machines and timings under qemu say nothing, so
this compares what the kernels issue: each basic block that runs ``sdot`` (a kernel's inner loop
body) with its instruction, ``sdot``, load and store counts, and instructions per ``sdot`` (one
``sdot`` = 4 rows x 4 codes = 16 multiply-adds). The fixed kernels have one such block; the
nested kernel one per derived width, in source order (2, 3, 4, 8 bits of 8-bit storage; the
widths are told apart by their loads and ``eor``: only the 8-bit nest recentres its codes).

Usage::

    python benchmarks/kernel_asm.py [--target raspberry-pi-5] [--n 1024 --k 2048 --group-size 64]
"""

from __future__ import annotations

import argparse
import re


def sdot_blocks(func, target) -> list[tuple[str, list[str]]]:
    """(label, instructions) of each basic block of ``func``'s assembly that contains an ``sdot``."""
    import tvm
    asm = tvm.compile(tvm.IRModule({"gemv": func}), target=target).mod.inspect_source("asm")
    blocks, label, cur = [], None, []
    for line in asm.splitlines():
        if re.match(r"^[.\w$]+:", line):
            if cur:
                blocks.append((label, cur))
            label, cur = line.split(":")[0], []
        elif re.match(r"^\s+[a-z]", line):
            cur.append(line.strip())
    if cur:
        blocks.append((label, cur))
    return [(lb, ins) for lb, ins in blocks if any(i.startswith("sdot") for i in ins)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="raspberry-pi-5")
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--group-size", type=int, default=64)
    args = ap.parse_args()
    from moec.core.targets import load_target
    from moec.lower.kernels.factory import make_gemv, make_nested_gemv

    target = load_target(args.target).tvm()
    n, k, gs, experts, top_k = args.n, args.k, args.group_size, 64, 8
    rows = [(f"fixed {b}-bit", make_gemv(b, n, k, gs, experts, top_k, target, activations="int8")) for b in (2, 4, 8)]
    nested = make_nested_gemv(8, n, k, gs, experts, top_k, target, activations="int8")
    print(f"## ARM dotprod decode GEMVs on {args.target}: sdot blocks ([{n}, {k}], group {gs})\n")
    print("| kernel | block | instructions | sdot | instructions / sdot | loads | stores |")
    print("|---|---|---|---|---|---|---|")
    for label, func in rows:
        blocks = sdot_blocks(func, target)
        for name, ins in blocks:
            _row(label, name, ins)
    for width, (name, ins) in zip((2, 3, 4, 8), sdot_blocks(nested, target)):
        _row(f"nested 8 → {width}-bit", name, ins)


def _row(label: str, name: str, ins: list[str]) -> None:
    sdot = sum(i.startswith("sdot") for i in ins)
    loads = sum(i.startswith(("ldr", "ldp", "ld1")) for i in ins)
    stores = sum(i.startswith(("str", "stp", "st1")) for i in ins)
    print(f"| {label} | {name} | {len(ins)} | {sdot} | {len(ins) / sdot:.2f} | {loads} | {stores} |")


if __name__ == "__main__":
    main()
