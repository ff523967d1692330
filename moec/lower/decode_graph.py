"""Relax decode-step function of a canonical MoE model under a bit plan.

``decode(token [1] int32, past_k_0, past_v_0, …, *params) -> (logits [1, V], present_k_0, present_v_0, …)``
where ``past_*`` are ``[kv_heads, P, head_dim]`` (P symbolic, the cached length = the new
token's position) and ``present_*`` are ``[kv_heads, P + 1, head_dim]``. Experts are called
per bit class with the routed ids remapped into that class' stack (see ``params.py``), so
only routed experts' weights are read.
"""

from __future__ import annotations

import math

import numpy as np
from tvm import relax, tirx

from moec.lower import te_ops
from moec.lower.linear import LinearEmitter
from moec.lower.params import ModelParams
from moec.models.config import MoEConfig


class DecodeBuilder:
    def __init__(self, cfg: MoEConfig, params: ModelParams, linear: LinearEmitter) -> None:
        self.cfg, self.params, self.linear = cfg, params, linear
        self.vars: dict[str, relax.Var] = {}
        for name, arr in params.flat():
            self.vars[name] = relax.Var(name, relax.TensorType(arr.shape, str(arr.dtype)))

    # -- small helpers ---------------------------------------------------------------
    def _rms(self, bb, x, name):
        # marked scheduled + opaque: dlight's CPU reduction rule would recompute the sum of
        # squares once per output element; the plain loop nest is already right for a vector
        return bb.emit_te(te_ops.rms_norm, x, self.vars[name], self.cfg.rms_eps,
                          primfunc_attrs={"tirx.is_scheduled": True, "op_pattern": 8})

    def _lin(self, bb, x, name):
        y = self.linear.dense(bb, x, self.params.entries[name], self.vars, name)
        bias = name.replace(".weight", ".bias")
        if bias in self.vars:
            y = bb.emit(relax.op.add(y, self.vars[bias]))
        return y

    def build(self) -> relax.Function:
        cfg = self.cfg
        bb = relax.BlockBuilder()
        p = tirx.Var("P", "int64")
        kv = (cfg.num_kv_heads, p, cfg.head_dim)
        token = relax.Var("token", relax.TensorType((1,), "int32"))
        past = [relax.Var(f"past_{kind}_{i}", relax.TensorType(kv, "float32"))
                for i in range(cfg.num_layers) for kind in ("k", "v")]
        with bb.function("decode", [token] + past + list(self.vars.values())):
            with bb.dataflow():
                x = self.linear.embed(bb, token, self.params.entries["embed.weight"], self.vars)
                presents = []
                for i in range(cfg.num_layers):
                    x, pk, pv = self._layer(bb, i, x, past[2 * i], past[2 * i + 1])
                    presents += [pk, pv]
                h = self._rms(bb, x, "norm.weight")
                head = "embed.weight" if cfg.tie_embeddings else "lm_head.weight"
                logits = self._lin(bb, h, head)
                out = bb.emit_output(relax.Tuple([logits] + presents))
            bb.emit_func_output(out)
        return bb.get()

    # -- one decoder layer -----------------------------------------------------------
    def _layer(self, bb, i, x, past_k, past_v):
        cfg = self.cfg
        pre = f"layers.{i}"
        h = self._rms(bb, x, f"{pre}.attn_norm.weight")
        q = self._lin(bb, h, f"{pre}.attn.q_proj.weight")
        k = self._lin(bb, h, f"{pre}.attn.k_proj.weight")
        v = self._lin(bb, h, f"{pre}.attn.v_proj.weight")
        if cfg.qk_norm == "full":
            q, k = self._rms(bb, q, f"{pre}.attn.q_norm.weight"), self._rms(bb, k, f"{pre}.attn.k_norm.weight")
        q = bb.emit(relax.op.reshape(q, (cfg.num_heads, cfg.head_dim)))
        k = bb.emit(relax.op.reshape(k, (cfg.num_kv_heads, cfg.head_dim)))
        if cfg.qk_norm == "head":
            q, k = self._rms(bb, q, f"{pre}.attn.q_norm.weight"), self._rms(bb, k, f"{pre}.attn.k_norm.weight")
        q = bb.emit_te(lambda t, c: te_ops.rope(t, c.shape[1], cfg.rope_theta), q, past_k, primfunc_name_hint="rope")
        k = bb.emit_te(lambda t, c: te_ops.rope(t, c.shape[1], cfg.rope_theta), k, past_k, primfunc_name_hint="rope")
        v = bb.emit(relax.op.reshape(v, (cfg.num_kv_heads, 1, cfg.head_dim)))
        k = bb.emit(relax.op.reshape(k, (cfg.num_kv_heads, 1, cfg.head_dim)))
        keys = bb.emit(relax.op.concat([past_k, k], axis=1))
        values = bb.emit(relax.op.concat([past_v, v], axis=1))
        q = bb.emit(relax.op.multiply(q, relax.const(np.float32(1.0 / math.sqrt(cfg.head_dim)))))
        scores = bb.emit_te(te_ops.attention_scores, q, keys)
        probs = bb.emit(relax.op.nn.softmax(scores, axis=-1))
        attn = bb.emit_te(te_ops.attention_values, probs, values)
        attn = bb.emit(relax.op.reshape(attn, (1, cfg.num_heads * cfg.head_dim)))
        x = bb.emit(relax.op.add(x, self._lin(bb, attn, f"{pre}.attn.o_proj.weight")))
        h = self._rms(bb, x, f"{pre}.mlp_norm.weight")
        if i in cfg.dense_layers:
            y = self._swiglu(bb, h, f"{pre}.mlp")
        else:
            y = self._moe(bb, i, h)
        return bb.emit(relax.op.add(x, y)), keys, values

    def _swiglu(self, bb, h, pre):
        a = bb.emit(relax.op.nn.silu(self._lin(bb, h, f"{pre}.w1.weight")))
        b = self._lin(bb, h, f"{pre}.w3.weight")
        return self._lin(bb, bb.emit(relax.op.multiply(a, b)), f"{pre}.w2.weight")

    def _moe(self, bb, i, h):
        cfg = self.cfg
        pre = f"layers.{i}.mlp"
        logits = self._lin(bb, h, f"{pre}.router.weight")
        probs = bb.emit(relax.op.nn.softmax(logits, axis=-1))
        topk = bb.emit(relax.op.topk(probs, cfg.top_k, axis=-1, ret_type="both", dtype="int32"))
        weights = bb.emit(relax.TupleGetItem(topk, 0))
        idx = bb.emit(relax.op.reshape(relax.TupleGetItem(topk, 1), (cfg.top_k,)))
        if cfg.norm_topk_prob:
            weights = bb.emit(relax.op.divide(weights, relax.op.sum(weights, axis=-1, keepdims=True)))
        weights = bb.emit(relax.op.reshape(weights, (cfg.top_k, 1)))
        classes = self.params.class_of[i]
        cls_of = bb.emit(relax.op.take(relax.const(classes, "int32"), idx, axis=0, mode="clip"))
        in_cls = bb.emit(relax.op.take(relax.const(self.params.remap[i], "int32"), idx, axis=0, mode="clip"))
        y = None
        for c in sorted(set(classes.tolist())):
            member = bb.emit(relax.op.equal(cls_of, relax.const(np.int32(c))))
            ids = bb.emit(relax.op.where(member, in_cls, relax.const(np.int32(-1))))
            name = f"layers.{i}.experts.b{c}"
            g1 = self.linear.experts(bb, h, self.params.entries[f"{name}.w1"], self.vars, f"{name}.w1", ids)
            g3 = self.linear.experts(bb, h, self.params.entries[f"{name}.w3"], self.vars, f"{name}.w3", ids)
            act = bb.emit(relax.op.multiply(relax.op.nn.silu(g1), g3))
            out = self.linear.experts(bb, act, self.params.entries[f"{name}.w2"], self.vars, f"{name}.w2", ids)
            y = out if y is None else bb.emit(relax.op.add(y, out))
        y = bb.emit(relax.op.sum(relax.op.multiply(y, weights), axis=0, keepdims=True))
        if cfg.shared_intermediate:
            s = self._swiglu(bb, h, f"{pre}.shared")
            if cfg.shared_gate:
                s = bb.emit(relax.op.multiply(relax.op.sigmoid(self._lin(bb, h, f"{pre}.shared_gate.weight")), s))
            y = bb.emit(relax.op.add(y, s))
        return y
