"""Run-time plans of a nested bundle: parsing a plan, the bytes it reads, and the record of each switch.

A nested bundle (``moec compile --nested B``) reads each routed expert's width from the int32
tables ``layers.L.experts.prec`` among its parameters (``moec.core.run_plan``). Switching plans is
replacing those tables between two calls: no rebuild, no reload, the KV cache untouched. Only the
routed experts' widths come from a run-time plan; every other weight keeps the width it was compiled at.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moec.core.config import MoEConfig
from moec.core.errors import MoecError
from moec.core.formats import get_nested_format
from moec.core.plan import BitPlan, uniform_plan


@dataclass(frozen=True)
class PlanSwitch:
    """One plan switch of a session.

    Attributes
    ----------
    step : int
        Calls (decode steps and prefills) the session had run when the switch took effect.
    seconds : float
        Wall time of the switch (validation and the table copies).
    changed : int
        Experts whose width changed.
    average_bits : float
        Mean routed-expert width of the new plan.
    expert_bytes : int
        Routed-expert bytes the new plan reads when every expert is used (codes, scales, zeros).
    """

    step: int
    seconds: float
    changed: int
    average_bits: float
    expert_bytes: int


def as_plan(spec: "BitPlan | dict | str | os.PathLike", cfg: MoEConfig) -> BitPlan:
    """A run-time plan from a BitPlan, plan JSON (a dict), a plan file or ``uniform:B``; one-line errors."""
    if isinstance(spec, BitPlan):
        return spec
    if isinstance(spec, dict):
        return BitPlan.from_json(spec, source="plan")
    text = str(spec)
    if text.startswith("uniform:"):
        m = re.fullmatch(r"uniform:([0-9]{1,2})", text, re.ASCII)
        if not m:
            raise MoecError(f"bad plan spec '{text[:40]}'; expected uniform:<bits>")
        return uniform_plan(cfg, int(m.group(1)))
    if not Path(text).is_file():
        raise MoecError(f"plan '{text[:80]}' is neither a plan file nor uniform:<bits>")
    return BitPlan.load(text)


def nested_array_bytes(names: list[str], shapes: list[tuple[tuple[int, ...], str]]) -> dict[str, dict[str, int]]:
    """Bytes of one expert's arrays of each nested stack: ``{entry: {"seg0": …, "scale": …, "zero": …}}``.

    ``names`` are a bundle's parameter names and ``shapes`` their (shape, dtype), expert axis first. CPU
    bundles name the kernel-layout arrays ``kseg0``… / ``kscale`` / ``kzero``, CUDA bundles ``seg0``… /
    ``scale`` / ``zero``; both give the same keys here."""
    out: dict[str, dict[str, int]] = {}
    for name, (shape, dtype) in zip(names, shapes):
        if ".experts.nested." in name:
            entry, array = name.rsplit(".", 1)
            out.setdefault(entry, {})[array.removeprefix("k")] = \
                int(np.prod(shape[1:])) * np.dtype(dtype).itemsize
    return out


def width_bytes(arrays: dict[str, int], segments: int) -> int:
    """Bytes one expert reads at a width that needs its ``segments`` leading bit-plane segments: those planes,
    its scales and its zeros (``arrays``: one entry of :func:`nested_array_bytes`)."""
    return sum(arrays[f"seg{s}"] for s in range(segments)) + arrays["scale"] + arrays["zero"]


def expert_bytes(storage_bits: int, per_expert: dict[str, dict[str, int]], tables: dict[str, np.ndarray]) -> int:
    """Routed-expert bytes a plan reads (every expert used once): its planes, scales and zeros.

    ``per_expert`` maps each nested entry (``layers.L.experts.nested.w1``…) to the bytes of one
    expert's ``seg{s}`` / ``scale`` / ``zero`` arrays; ``tables`` are the plan's width tables.
    """
    fmt = get_nested_format(storage_bits)
    total = 0
    for entry, sizes in per_expert.items():
        widths = tables[entry.rsplit(".nested.", 1)[0] + ".prec"]
        for bits in widths.tolist():
            total += width_bytes(sizes, fmt.derived_bits.index(int(bits)) + 1)
    return total
