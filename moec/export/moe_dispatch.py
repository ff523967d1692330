"""Routed MoE block in ONNX: router top-k, then one ``If`` per expert that runs only when a token chose it.

Construction (identical in the prefill and decode graphs; ``x`` is ``[T, H]``)::

    probs = Softmax(router(x))                       [T, E]
    w, idx = TopK(probs, k)                          [T, k]   (w /= ReduceSum(w) if norm_topk_prob)
    gates  = ScatterElements(0[T,E], idx, w)         gate of expert e for token t, 0 if not routed
    hits   = ScatterElements(0[T,E], idx, 1)         1 where token t routed to expert e
    routed = ReduceMax(hits, axis 0) > 0             [E] bool: expert e chosen by some token
    cond_0..cond_E-1 = Split(routed)                 one [1] bool per expert
    acc_0  = 0[T, H]
    acc_e+1 = If(cond_e,
                 then: tok = NonZero(hits[:, e]);                      tokens routed to e (grouped)
                       y  = expert_e(Gather(x, tok)) * Gather(gates[:, e], tok)
                       ScatterND(acc_e, tok, y, reduction="add"),
                 else: Identity(acc_e))
    y = acc_E (+ sigmoid(shared_gate(x)) * shared_expert(x))

An expert's weights are read only inside its then-branch, so a decode step touches exactly the
top-k experts' packed weights (onnxruntime never evaluates the branch not taken), and prefill
runs each expert once on the group of tokens routed to it. Contributions are accumulated in
expert order per token, as the torch model does. Every node of expert ``e``'s branch, and its
``If``, carries ``metadata_props`` ``layer``, ``expert``, ``bits``, ``group_size``.
"""

from __future__ import annotations

from onnx import helper

from moec.export.layers import swiglu
from moec.export.onnx_graph import FLOAT, GraphBuilder, tensor_info
from moec.export.quantized_matmul import StoredWeight, linear
from moec.core.config import MoEConfig
from moec.core.inventory import expert_key


def moe_block(gb: GraphBuilder, cfg: MoEConfig, layer: int, x: str, w: dict[str, StoredWeight]) -> str:
    """The MoE MLP of ``layer`` on ``x [T, H]`` -> ``[T, H]``."""
    p = f"layers.{layer}.mlp"
    with gb.name_scope("router"):
        probs = gb.op("Softmax", [linear(gb, x, w[f"{p}.router.weight"])], axis=-1)
        top_w, top_i = gb.op("TopK", [probs, gb.i64(cfg.top_k)], n_out=2, axis=-1, largest=1, sorted=1)
        if cfg.norm_topk_prob:
            top_w = gb.op("Div", [top_w, gb.op("ReduceSum", [top_w, gb.i64(-1)], keepdims=1)])
        zeros = gb.op("ConstantOfShape", [gb.op("Shape", [probs])])  # float32 0 [T, E]
        ones = gb.op("ConstantOfShape", [gb.op("Shape", [top_w])], value=helper.make_tensor("one", FLOAT, [1], [1.0]))
        gates = gb.op("ScatterElements", [zeros, top_i, top_w], axis=1)
        hits = gb.op("ScatterElements", [zeros, top_i, ones], axis=1)
        routed = gb.op("Greater", [gb.op("ReduceMax", [hits, gb.i64(0)], keepdims=0), gb.f32(0.0)])
        # one Split into E one-element conditions (cheaper than a Gather per expert)
        conds = gb.op("Split", [routed], n_out=cfg.num_experts, axis=0, num_outputs=cfg.num_experts)
        conds = [conds] if isinstance(conds, str) else conds
        acc = gb.op("ConstantOfShape", [gb.op("Shape", [x])])  # float32 zeros [T, H]
    for e in range(cfg.num_experts):
        bits = w[expert_key(layer, e, "w1")].bits
        with gb.meta(layer=layer, expert=e, bits=bits, group_size=w[expert_key(layer, e, "w1")].group_size), \
                gb.name_scope(f"E{e}"):
            acc = _expert_if(gb, cfg, layer, e, x, gates, hits, conds[e], acc, w)
    if cfg.shared_intermediate:
        with gb.name_scope("shared"):
            s = swiglu(gb, x, w[f"{p}.shared.w1.weight"], w[f"{p}.shared.w3.weight"], w[f"{p}.shared.w2.weight"])
            if cfg.shared_gate:
                s = gb.op("Mul", [gb.op("Sigmoid", [linear(gb, x, w[f"{p}.shared_gate.weight"])]), s])
            acc = gb.op("Add", [acc, s])
    return acc


def _expert_if(gb: GraphBuilder, cfg: MoEConfig, layer: int, e: int, x: str, gates: str, hits: str,
               cond: str, acc: str, w: dict[str, StoredWeight]) -> str:
    col = gb.scalar_i64(e)
    then = gb.branch()
    tok = then.op("NonZero", [then.op("Gather", [hits, col], axis=1)])            # [1, n]
    tok_col = then.op("Transpose", [tok], perm=[1, 0])                               # [n, 1] ScatterND indices
    tok_flat = then.op("Reshape", [tok, then.i64(-1)])                               # [n]
    xe = then.op("Gather", [x, tok_flat], axis=0)                                    # [n, H]
    ge = then.op("Unsqueeze", [then.op("Gather", [then.op("Gather", [gates, col], axis=1), tok_flat], axis=0),
                               then.i64(-1)])                                        # [n, 1]
    ws = [w[expert_key(layer, e, proj)] for proj in ("w1", "w3", "w2")]
    ye = then.op("Mul", [swiglu(then, xe, *ws), ge])
    out_then = then.op("ScatterND", [acc, tok_col, ye], reduction="add")
    other = gb.branch()
    out_else = other.op("Identity", [acc])
    shape = [None, cfg.hidden_size]
    then_graph = then.to_graph(f"L{layer}_E{e}_routed", [], [tensor_info(out_then, FLOAT, shape)])
    else_graph = other.to_graph(f"L{layer}_E{e}_skip", [], [tensor_info(out_else, FLOAT, shape)])
    return gb.op("If", [cond], then_branch=then_graph, else_branch=else_graph)

