"""How the graphs compute linear layers: the reference emitter (TE dequantize + matmul).

A ``LinearEmitter`` emits into a Relax block: a plain linear layer (one row in decode,
``dense_rows`` for a prefill chunk), a routed call on one bit class' expert stack (rows with
id -1 give zeros and read no weights of their own), the grouped call of prefill (rows sorted by
expert; only kernel emitters have one, so prefill is emitted only with kernels), and the
embedding lookup. The reference emitter here is target-neutral and unscheduled; a kernel
emitter with scheduled fused GEMVs and grouped GEMMs replaces it per target.
"""

from __future__ import annotations

import numpy as np
from tvm import relax

from moec.core.errors import MoecError
from moec.lower import te_ops
from moec.lower.params import WeightEntry


def clamped_ids(bb, ids):
    """Routed ids with -1 (a row of another bit class) read as expert 0, so a kernel may index the stack."""
    return bb.emit(relax.op.maximum(ids, relax.const(np.int32(0))))


def zero_other_rows(bb, y, ids):
    """``y [k, N]`` with the rows of id -1 set to 0."""
    mask = bb.emit(relax.op.astype(relax.op.greater_equal(ids, relax.const(np.int32(0))), "float32"))
    return bb.emit(relax.op.multiply(y, relax.op.reshape(mask, (int(ids.ty.shape[0]), 1))))


def _dequant_args(entry: WeightEntry, arrays: list) -> tuple:
    """``(super_scale, super_groups)`` of double-quantized scales (``arrays`` ends with it), else ``()``."""
    return (arrays[3], entry.super_groups) if entry.super_groups else ()


def _quant_names(entry: WeightEntry) -> tuple[str, ...]:
    return ("packed", "scale", "zero") + (("super_scale",) if entry.super_groups else ())


class LinearEmitter:
    """Reference: dequantize with TE, then ``relax.op.matmul``."""

    def relayout(self, name: str, entry: WeightEntry) -> bool:
        """Put ``entry``'s arrays (in place) in the layout this emitter's kernels read, before the build; True if
        it did. The reference reads moec's packed layout."""
        return False

    def _weight(self, bb, entry: WeightEntry, vars_, name, lead=None):
        n, k = entry.shape
        if "weight" in entry.arrays:
            w = vars_[f"{name}.weight"]
            if lead is not None:
                w = bb.emit(relax.op.take(w, lead, axis=0, mode="clip"))
            return bb.emit(relax.op.astype(w, "float32"))
        arrays = [vars_[f"{name}.{a}"] for a in _quant_names(entry)]
        if lead is not None:
            arrays = [bb.emit(relax.op.take(t, lead, axis=0, mode="clip")) for t in arrays]
        group = entry.group
        return bb.emit_te(te_ops.dequantize, *arrays[:3], entry.bits, n, k, group, *_dequant_args(entry, arrays))

    def dense(self, bb, x, entry: WeightEntry, vars_, name):
        w = self._weight(bb, entry, vars_, name)
        return bb.emit(relax.op.matmul(x, relax.op.permute_dims(w)))

    def dense_rows(self, bb, x, entry: WeightEntry, vars_, name):
        """``dense`` for ``x [T, K]`` with many rows (prefill); the reference matmul takes any T."""
        return self.dense(bb, x, entry, vars_, name)

    def grouped(self, bb, x, entry: WeightEntry, vars_, name, offsets, rows=None):
        """Rows of ``x`` sorted by stacked expert (``offsets``) times their expert: needs kernels.

        With ``rows`` (int32 ``[P]``) the sorted input is ``x[rows]`` (``x`` unsorted, e.g. one row
        per token for ``top_k`` pairs each), gathered by the emitter or inside its kernel."""
        return None

    #: Whether a prefill's row-wise work (norms, SiLU, causal attention) runs on the CPU row kernels
    #: (``kernels/rowwise.py``, ``kernels/attention.py``); else the decode builder's TE forms.
    cpu_rows = True

    def prefill_attention(self, bb, q, keys, values):
        """Causal attention of a prefill chunk's rows ``q [T, heads, hd]`` (pre-scaled) over ``keys`` / ``values``
        ``[kv_heads, P + T, d]`` → ``[T, heads, vd]`` in one kernel, or None (the graph's own forms); asked only
        of emitters without ``cpu_rows``, for attention without a sliding window or sinks."""
        return None

    def has_grouped(self, entry: WeightEntry) -> bool:
        """Whether :meth:`grouped` (:meth:`nested_grouped` for a nested stack) takes this expert stack: the prefill
        function is emitted only where every stack has one."""
        return False

    def gathers_rows(self, entry: WeightEntry) -> bool:
        """Whether ``grouped`` (``nested_grouped`` for a nested stack) on this weight gathers ``rows`` inside its
        kernel (an int8-activation kernel quantizing each row of ``x`` once): the graph then passes the token rows
        and their indices instead of a gathered copy."""
        return False

    def experts(self, bb, x, entry: WeightEntry, vars_, name, ids):
        w = self._weight(bb, entry, vars_, name, lead=clamped_ids(bb, ids))  # [k, N, K]
        k_rows = int(ids.ty.shape[0])
        x3 = bb.emit(relax.op.reshape(x, (-1, 1, entry.shape[1])))       # [1 or k, 1, K]
        y = bb.emit(relax.op.matmul(x3, relax.op.permute_dims(w, [0, 2, 1])))
        y = bb.emit(relax.op.reshape(y, (k_rows, entry.shape[0])))
        return zero_other_rows(bb, y, ids)

    def routed_experts(self, bb, x, entry: WeightEntry, vars_, name, ids):
        """``experts`` when every id is valid (a layer whose experts are all in this one stack): emitters whose
        ``experts`` masks rows of id -1 may skip that."""
        return self.experts(bb, x, entry, vars_, name, ids)

    def swiglu_experts(self, bb, x, gate: WeightEntry, up: WeightEntry, vars_, gate_name, up_name, ids):
        """``silu(gate x) * (up x)`` ``[k, N]`` of the routed ``ids`` (-1: a row of another bit class, output 0) in
        one fused call, or None when the emitter has no such kernel for these weights (the caller then calls
        :meth:`experts` twice and applies the block's gated activation)."""
        return None

    def nested_experts(self, bb, x, entry: WeightEntry, vars_, name, ids, prec):
        """Routed rows of a nested stack at the widths of run-time table ``prec``: needs kernels."""
        raise MoecError("nested expert storage needs moec's kernels (x86, arm or cuda backend), not the reference "
                        "emitter")

    def nested_swiglu_experts(self, bb, x, gate: WeightEntry, up: WeightEntry, vars_, gate_name, up_name, ids, prec):
        """``silu(gate x) * (up x)`` of two nested stacks' routed rows at the widths of ``prec`` in one fused call, or
        None when the emitter has no such kernel (the caller then calls :meth:`nested_experts` twice)."""
        return None

    def nested_grouped(self, bb, x, entry: WeightEntry, vars_, name, offsets, prec, rows=None):
        """Prefill rows of a nested stack sorted by expert (``offsets``; ``x[rows]`` when ``rows`` is given) at the
        widths of ``prec``: needs kernels."""
        return self.nested_experts(bb, x, entry, vars_, name, None, prec)

    def decode_attention(self, bb, q, k, v, cache_k, cache_v, pos, scale: float):
        """One token's ``(attention [heads, value_dim], cache_k, cache_v)`` from one kernel that also writes
        ``k``/``v`` ``[kv_heads, 1, width]`` into row ``pos`` of the fixed-capacity caches in place (the
        caches returned are those arguments); or None: the graph then writes the caches and emits the
        scores, softmax and values as ops."""
        return None

    def row_topk(self, bb, x, k: int):
        """``(values, indices)`` of the ``k`` largest entries of each row of ``x [R, n]`` from one kernel (ties
        to the lower index, as Relax's ``topk``), or None: the graph then emits Relax's ``topk``."""
        return None

    def row_silu(self, bb, x):
        """``silu(x)`` of ``x [R, width]`` from one vectorised kernel (the prefill's ``row_silu``), or None: the graph
        then emits Relax's ``silu``."""
        return None

    def embed(self, bb, token, entry: WeightEntry, vars_):
        n, k = entry.shape
        if "weight" in entry.arrays:
            row = bb.emit(relax.op.take(vars_["embed.weight.weight"], token, axis=0, mode="clip"))
            return bb.emit(relax.op.astype(row, "float32"))
        arrays = [bb.emit(relax.op.take(vars_[f"embed.weight.{a}"], token, axis=0, mode="clip"))
                  for a in _quant_names(entry)]
        group = entry.group
        rows = token.ty.shape[0]  # 1 in decode, T (symbolic) in prefill
        return bb.emit_te(te_ops.dequantize, *arrays[:3], entry.bits, rows, k, group, *_dequant_args(entry, arrays))
