"""Resident entry points: ``decode_resident(token, pos)`` and ``prefill_resident(tokens, pos)``, the bundle's
``decode`` and ``prefill`` with their KV caches and weights read from the device's TVM tensor cache.

Over RPC the Relax VM is driven with ``set_input``, whose tensor arguments reach the device as raw
``DLTensor`` handles, which it copies into new tensors on every call: called there, ``decode`` copied every
weight and every KV cache once a step (and kept a second copy of the weights in device memory). A session on a
remote device instead places each weight and cache once, when it opens, into ``vm.builtin.tensor_cache``
under ``artifact/resident_keys.py``'s keys (one RPC session is one server process, so one cache), and
calls these entries, which look the tensors up (``vm.builtin.param_array_from_cache_by_name_unpacked``:
one call, the tensors themselves, no copy) and call ``decode`` / ``prefill`` on them: a step sends a token and
a position, and gets back the logits, the greedy token with a finiteness flag (``generate`` over RPC reads
those two integers and leaves the logits on the device) and a nested decode's routed ids. The caches are
written in place as in a local call. A local session passes the tensors as
arguments (no copy there) and never calls these.
"""

from __future__ import annotations

import tvm
from tvm import relax, tirx

from moec.artifact.resident_keys import SUFFIX, cache_key, param_key

LOOKUP = "vm.builtin.param_array_from_cache_by_name_unpacked"


def _fresh(ty: relax.TensorType, sizes: dict[str, tirx.Var]) -> relax.TensorType:
    """``ty`` with its symbolic sizes replaced by this function's own variables (one per name)."""
    dims = [d if isinstance(d, tirx.IntImm) else sizes.setdefault(d.name, tirx.Var(d.name, "int64"))
            for d in ty.shape.values]
    return relax.TensorType(dims, ty.dtype)


def _greedy(bb: relax.BlockBuilder, logits: relax.Var) -> relax.Var:
    """``[argmax, all finite]`` (int32 [2]) of the logits row ``[1, V]``: what a greedy generation needs, two
    integers instead of the row (200 KB at OLMoE's vocabulary) across the network."""
    op = relax.op
    best = bb.emit(op.astype(op.argmax(logits, axis=1), "int32"))
    finite = bb.emit(op.min(op.astype(op.isfinite(logits), "int32"), axis=1))
    return bb.emit(op.concat([best, finite], axis=0))


def add_resident_entries(bb: relax.BlockBuilder, names: tuple[str, ...] = ("decode", "prefill")) -> list[str]:
    """Add ``NAME_resident`` for each of ``names`` that ``bb``'s module has; returns the names added."""
    mod, added = bb.get(), []
    for name in names:
        if not any(gv.name_hint == name for gv in mod.functions):
            continue
        gv = mod.get_global_var(name)
        func = mod[gv]
        n_in = int(func.attrs["num_input"])  # tokens, pos, then the caches; the weights follow
        tokens, pos = func.params[:2]
        caches, weights = func.params[2:n_in], func.params[n_in:]
        sizes: dict[str, tirx.Var] = {}
        args = [relax.Var(tokens.name, _fresh(tokens.ty, sizes)), relax.Var(pos.name, pos.ty)]
        with bb.function(name + SUFFIX, args):
            found = bb.emit(relax.call_pure_packed(
                LOOKUP, *[tvm.ir.StringImm(cache_key(i)) for i in range(len(caches))],
                *[tvm.ir.StringImm(param_key(i)) for i in range(len(weights))],
                ty_args=[relax.TupleType([relax.TensorType(ndim=c.ty.ndim, dtype=c.ty.dtype) for c in caches]
                                         + [w.ty for w in weights])]))
            # the caches' capacity is the session's: bound (and checked) here; the weights' shapes are static
            cached = [bb.match_cast(bb.emit(relax.TupleGetItem(found, i)), _fresh(c.ty, sizes))
                      for i, c in enumerate(caches)]
            held = [bb.emit(relax.TupleGetItem(found, len(caches) + i)) for i in range(len(weights))]
            out = bb.emit(relax.Call(gv, args + cached + held))
            # the logits, the greedy token and (a nested decode) the routed ids; not the caches: they stay where
            # they are held, and every tensor returned is one more handle to ship over RPC
            logits = bb.emit(relax.TupleGetItem(out, 0))
            rest = [bb.emit(relax.TupleGetItem(out, i)) for i in range(1 + len(caches), len(out.ty.fields))]
            bb.emit_func_output(relax.Tuple([logits, _greedy(bb, logits), *rest]))
        added.append(name + SUFFIX)
    return added
