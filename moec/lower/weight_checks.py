"""Drop the per-call shape and dtype checks of a function's weights (VM builtins run on every call).

``VMShapeLower`` checks every argument of a Relax function on every call: a
``vm.builtin.check_tensor_info`` and a ``vm.builtin.match_shape`` per tensor, about 230 VM
builtins per decode step of the reference model's 112 weights against ~110 kernels. The weights
never change between calls: the session passes the tensors of the bundle's ``weights.bin``, laid
out by ``weights.json``, both hash-checked with ``lib.so`` when the bundle loads, so their shapes
are the ones this library was compiled for. This pass, run after ``VMShapeLower``, removes those
two checks for the arguments after a function's ``num_input`` (the weights, see
``decode_graph.py``) whose shapes are static (a check that binds a symbolic size is kept). The
token, position and KV-cache arguments keep theirs.
"""

from __future__ import annotations

import tvm
from tvm import relax

_CHECKS = ("vm.builtin.check_tensor_info", "vm.builtin.match_shape")


def _static(var: relax.Var) -> bool:
    ty = var.ty
    return isinstance(ty, relax.TensorType) and ty.shape is not None and all(
        isinstance(d, tvm.tirx.IntImm) for d in ty.shape.values)


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
