"""Fewer Relax VM builtins per decode step: two passes of the finalize phase (``lower/pipeline.py``).

**Weight checks** (``drop_weight_checks``).
``VMShapeLower`` checks every argument of a Relax function on every call: a
``vm.builtin.check_tensor_info`` and a ``vm.builtin.match_shape`` per tensor, about 230 VM
builtins per decode step of the reference model's 112 weights against ~110 kernels. The weights
never change between calls: the session passes the tensors of the bundle's ``weights.bin``, laid
out by ``weights.json``, both hash-checked with ``lib.so`` when the bundle loads, so their shapes
are the ones this library was compiled for. This pass, run after ``VMShapeLower``, removes those
two checks for the arguments after a function's ``num_input`` (the weights, see
``decode_graph.py``) whose shapes are static (a check that binds a symbolic size is kept). The
token, position and KV-cache arguments keep theirs.

**Kills of static storage** (``keep_static_storage``). ``KillAfterLastUse`` ends every
intermediate's life with a ``kill_object`` (a ``vm.builtin.null_value`` call each: ~140 per step
of the reference model). In ``decode`` the intermediates sit in storage of constant size that
``StaticPlanBlockMemory`` already shares between lifetimes, so freeing it early saves no memory
and the whole frame is released when the call returns: those kills, of constant-size storage and
of tensors placed in it, are dropped there. Kills of storage whose size depends on the cache
length (the op-by-op attention's copies of the cache) stay.
"""

from __future__ import annotations

import tvm
from tvm import relax

_CHECKS = ("vm.builtin.check_tensor_info", "vm.builtin.match_shape")


def _static(var: relax.Var) -> bool:
    ty = var.ty
    return isinstance(ty, relax.TensorType) and ty.shape is not None and all(
        isinstance(d, tvm.tirx.IntImm) for d in ty.shape.values)


def _op_call(value, name: str) -> bool:
    return isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and value.op.name == name


def _constant_storage(value, bound) -> bool:
    """Whether ``value`` allocates constant-size storage, or a tensor in such storage."""
    if _op_call(value, "relax.vm.alloc_tensor"):
        src = value.args[0]
        value = bound.get(src) if isinstance(src, relax.Var) else None
    if not _op_call(value, "relax.vm.alloc_storage"):
        return False
    size = value.args[0]
    return isinstance(size, relax.ShapeExpr) and all(isinstance(d, tvm.tirx.IntImm) for d in size.values)


@tvm.transform.module_pass(opt_level=0, name="moec.KeepStaticStorage")
def keep_static_storage(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """``mod`` with ``decode``'s kills of constant-size storage (and tensors in it) removed; run after
    ``LowerRuntimeBuiltin`` (which turns ``KillAfterLastUse``'s kills into ``relax.vm.kill_object``)."""
    for gv, func in list(mod.functions.items()):
        if gv.name_hint != "decode" or not isinstance(func, relax.Function) or not isinstance(func.body, relax.SeqExpr):
            continue
        bound = {}
        for block in func.body.blocks:
            for b in block.bindings:
                if isinstance(b, relax.VarBinding):
                    bound[b.var] = b.value

        def kept(b) -> bool:
            value = getattr(b, "value", None)
            if not _op_call(value, "relax.vm.kill_object") or not isinstance(value.args[0], relax.Var):
                return True
            return not _constant_storage(bound.get(value.args[0]), bound)

        blocks = [type(b)([x for x in b.bindings if kept(x)]) for b in func.body.blocks]
        mod[gv] = relax.Function(func.params, relax.SeqExpr(blocks, func.body.body), func.ret_ty, func.is_pure,
                                 func.attrs, func.span)
    return mod


def _is_weight_check(binding, weights) -> bool:
    value = getattr(binding, "value", None)
    if not isinstance(value, relax.Call) or not isinstance(value.op, relax.ExternFunc):
        return False
    return value.op.global_symbol in _CHECKS and len(value.args) > 0 and any(value.args[0].same_as(w) for w in weights)


@tvm.transform.module_pass(opt_level=0, name="moec.DropWeightChecks")
def drop_weight_checks(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """``mod`` with the static weights' per-call checks removed from functions that carry ``num_input``."""
    for gv, func in list(mod.functions.items()):
        if not isinstance(func, relax.Function) or func.attrs is None or "num_input" not in func.attrs:
            continue
        weights = [p for p in func.params[int(func.attrs["num_input"]):] if _static(p)]
        if not weights or not isinstance(func.body, relax.SeqExpr):
            continue
        blocks = [type(b)([x for x in b.bindings if not _is_weight_check(x, weights)]) for b in func.body.blocks]
        mod[gv] = relax.Function(func.params, relax.SeqExpr(blocks, func.body.body), func.ret_ty, func.is_pure,
                                 func.attrs, func.span)
    return mod
