"""Host-memory budget of a pipeline stage: whole model or layer by layer, and an early error when neither fits."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

from moec.core.errors import MoecError
from moec.models.lazy import _DTYPES, LazyCheckpoint

GB = 1 << 30
#: Above this many float32 bytes a checkpoint is processed layer by layer when no budget is given.
WHOLE_MODEL_LIMIT = 2 * GB
#: Interpreter, torch, TVM and onnx libraries before any weight is read.
BASELINE = int(0.7 * GB)


@dataclass(frozen=True)
class MemoryPlan:
    """How a stage runs: ``sequential`` (one layer resident) or whole model; hidden states spill above ``hidden_budget``."""

    sequential: bool
    hidden_budget: int
    layer_bytes: int
    whole_bytes: int


def layer_float32_bytes(ckpt: LazyCheckpoint) -> tuple[int, int]:
    """(largest decoder layer, largest non-layer tensor) in float32 bytes."""
    per_layer: dict[int, int] = defaultdict(int)
    other = 0
    for name, info in ckpt.index.items():
        n = (info.end - info.start) // _DTYPES[info.dtype][1] * (8 if info.dtype == "U8" else 4)  # U8: 2 FP4 codes
        m = re.match(r"model\.layers\.(\d+)\.", name)
        if m:
            per_layer[int(m.group(1))] += n
        else:
            other = max(other, n)
    return max(per_layer.values(), default=0), other


def memory_plan(ckpt: LazyCheckpoint, max_memory_gb: float | None, stage: str = "this stage") -> MemoryPlan:
    """Choose whole-model or layer-sequential processing of ``ckpt`` within ``max_memory_gb``.

    A layer-sequential stage holds one decoder layer in float32 plus its quantized/packed copy
    and temporaries (about 2x), or the embedding / LM head twice, plus the libraries.

    Raises
    ------
    MoecError
        If even one layer does not fit the budget (checked before any weight is read).
    """
    layer, other = layer_float32_bytes(ckpt)
    resident = BASELINE + max(2 * layer, 2 * other)
    whole = BASELINE + 2 * ckpt.float32_bytes
    if max_memory_gb is None:
        plan = MemoryPlan(ckpt.float32_bytes > WHOLE_MODEL_LIMIT, GB, layer, whole)
        return _whole_if_not_by_layer(ckpt, plan, stage)
    if max_memory_gb <= 0:
        raise MoecError(f"--max-memory-gb must be positive (got {max_memory_gb})")
    budget = int(max_memory_gb * GB)
    if resident > budget:
        raise MoecError(f"--max-memory-gb {max_memory_gb:g} is too small for {stage} of '{ckpt.root}': one decoder "
                        f"layer is {layer / GB:.2f} GB in float32 and needs about {resident / GB:.1f} GB resident")
    return _whole_if_not_by_layer(ckpt, MemoryPlan(whole > budget, max((budget - resident) // 2, 64 << 20),
                                                   layer, whole), stage)


def _whole_if_not_by_layer(ckpt: LazyCheckpoint, plan: MemoryPlan, stage: str) -> MemoryPlan:
    """``plan``, unless it is layer by layer for a checkpoint that cannot be read that way: a one-line error."""
    if plan.sequential and not ckpt.reads_by_layer:
        raise MoecError(f"{stage} of '{ckpt.root}' ({ckpt.cfg.architecture}) needs about {plan.whole_bytes / GB:.1f} GB "
                        "for the whole model, and this family cannot be processed layer by layer yet; "
                        "pass a larger --max-memory-gb on a machine that has it")
    return plan
