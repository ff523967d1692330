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
from moec.core.config import MoEConfig


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

    def _dense(self, bb, x, name):
        """A linear layer on one row (decode); prefill overrides it for many rows."""
        return self.linear.dense(bb, x, self.params.entries[name], self.vars, name)

    def _lin(self, bb, x, name):
        y = self._dense(bb, x, name)
        bias = name.replace(".weight", ".bias")
        if bias in self.vars:
            y = bb.emit(relax.op.add(y, self.vars[bias]))
        return y

    #: Name of the emitted function and of its token argument.
    function_name, tokens_name = "decode", "token"

    def _token_count(self):
        """Tokens per call: 1 in decode (prefill: a symbolic ``T``)."""
        return 1

    def _last(self, bb, x):
        """The row whose logits are returned (decode has one)."""
        return x

    def build(self, bb: relax.BlockBuilder | None = None):
        """Emit the function into ``bb`` (a new builder if None); returns the builder's module."""
        cfg = self.cfg
        bb = bb or relax.BlockBuilder()
        p = tirx.Var("P", "int64")
        kv = (cfg.num_kv_heads, p, cfg.head_dim)
        tokens = relax.Var(self.tokens_name, relax.TensorType((self._token_count(),), "int32"))
        past = [relax.Var(f"past_{kind}_{i}", relax.TensorType(kv, "float32"))
                for i in range(cfg.num_layers) for kind in ("k", "v")]
        with bb.function(self.function_name, [tokens] + past + list(self.vars.values())):
            with bb.dataflow():
                x = self.linear.embed(bb, tokens, self.params.entries["embed.weight"], self.vars)
                presents = []
                for i in range(cfg.num_layers):
                    x, pk, pv = self._layer(bb, i, x, past[2 * i], past[2 * i + 1], p)
                    presents += [pk, pv]
                h = self._rms(bb, self._last(bb, x), "norm.weight")
                head = "embed.weight" if cfg.tie_embeddings else "lm_head.weight"
                logits = self._lin(bb, h, head)
                out = bb.emit_output(relax.Tuple([logits] + presents))
            bb.emit_func_output(out)
        return bb.get()

    # -- one decoder layer -----------------------------------------------------------
    def _layer(self, bb, i, x, past_k, past_v, p):
        cfg = self.cfg
        pre = f"layers.{i}"
        h = self._rms(bb, x, f"{pre}.attn_norm.weight")
        q, k, v = (self._lin(bb, h, f"{pre}.attn.{n}_proj.weight") for n in ("q", "k", "v"))
        if cfg.qk_norm == "full":
            q, k = self._rms(bb, q, f"{pre}.attn.q_norm.weight"), self._rms(bb, k, f"{pre}.attn.k_norm.weight")
        attn, keys, values = self._attention(bb, pre, q, k, v, past_k, past_v, p)
        x = bb.emit(relax.op.add(x, self._lin(bb, attn, f"{pre}.attn.o_proj.weight")))
        h = self._rms(bb, x, f"{pre}.mlp_norm.weight")
        y = self._swiglu(bb, h, f"{pre}.mlp") if i in cfg.dense_layers else self._moe(bb, i, h)
        return bb.emit(relax.op.add(x, y)), keys, values

    def _attention(self, bb, pre, q, k, v, past_k, past_v, p):
        """One token's attention over the cache: (output [1, H*hd], keys, values incl. the token)."""
        cfg = self.cfg
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
        return attn, keys, values

    def _swiglu(self, bb, h, pre):
        a = bb.emit(relax.op.nn.silu(self._lin(bb, h, f"{pre}.w1.weight")))
        b = self._lin(bb, h, f"{pre}.w3.weight")
        return self._lin(bb, bb.emit(relax.op.multiply(a, b)), f"{pre}.w2.weight")

    def _route(self, bb, i, h):
        """Router of layer ``i`` on ``h [R, H]``: (gate weights [R, k], and per (row, slot) pair
        flattened to ``[R*k]``: expert bit class, index in that class' stack)."""
        cfg = self.cfg
        probs = bb.emit(relax.op.nn.softmax(self._lin(bb, h, f"layers.{i}.mlp.router.weight"), axis=-1))
        topk = bb.emit(relax.op.topk(probs, cfg.top_k, axis=-1, ret_type="both", dtype="int32"))
        weights = bb.emit(relax.TupleGetItem(topk, 0))
        if cfg.norm_topk_prob:
            weights = bb.emit(relax.op.divide(weights, relax.op.sum(weights, axis=-1, keepdims=True)))
        idx = bb.emit(relax.op.reshape(relax.TupleGetItem(topk, 1), (h.ty.shape[0] * cfg.top_k,)))
        cls_of = bb.emit(relax.op.take(relax.const(self.params.class_of[i], "int32"), idx, axis=0, mode="clip"))
        in_cls = bb.emit(relax.op.take(relax.const(self.params.remap[i], "int32"), idx, axis=0, mode="clip"))
        return weights, cls_of, in_cls

    def _shared(self, bb, h, pre, y):
        """``y`` plus the (optionally gated) shared expert of MLP ``pre``, if the model has one."""
        if not self.cfg.shared_intermediate:
            return y
        s = self._swiglu(bb, h, f"{pre}.shared")
        if self.cfg.shared_gate:
            s = bb.emit(relax.op.multiply(relax.op.sigmoid(self._lin(bb, h, f"{pre}.shared_gate.weight")), s))
        return bb.emit(relax.op.add(y, s))

    def _moe(self, bb, i, h):
        cfg = self.cfg
        weights, cls_of, in_cls = self._route(bb, i, h)
        weights = bb.emit(relax.op.reshape(weights, (cfg.top_k, 1)))
        classes = self.params.class_of[i]
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
        return self._shared(bb, h, f"layers.{i}.mlp", y)
