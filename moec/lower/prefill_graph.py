"""Relax prefill function: a whole prompt chunk in one call, experts as grouped GEMMs.

``prefill(tokens [T] int32, past_k_0, past_v_0, …, *params) -> (logits [1, V], present_k_0, …)``
with ``T`` and the cached length ``P`` symbolic: row ``t`` sits at position ``P + t`` and
attends causally; the logits are those of the last row (the next token). Each MoE layer sorts
its ``T * top_k`` (token, slot) pairs per bit class by expert id in that class' stack
(``argsort`` of the remapped id, pairs of other classes last), computes
``offsets[e] = #pairs with id < e``, runs one grouped GEMM per projection over the sorted
rows (each expert's weights read once for all its tokens, experts without tokens skipped),
and scatters the rows back to their pairs. Dense projections are grouped GEMMs with one
"expert" holding every row.

The function is emitted only when every expert stack has a grouped-GEMM kernel
(:meth:`PrefillBuilder.supported`); otherwise the runtime prefills with decode steps.
"""

from __future__ import annotations

import math

import numpy as np
from tvm import relax, tirx

from moec.lower import te_ops
from moec.lower.decode_graph import DecodeBuilder


class PrefillBuilder(DecodeBuilder):
    """Builds the ``prefill`` function; shares parameters and helpers with the decode graph."""

    def supported(self) -> bool:
        """Whether the emitter has grouped-GEMM kernels for every expert stack."""
        return all(e.kernel for n, e in self.params.entries.items() if ".experts." in n)

    def _lin(self, bb, x, name):
        y = self.linear.dense_rows(bb, x, self.params.entries[name], self.vars, name)
        bias = name.replace(".weight", ".bias")
        if bias in self.vars:
            y = bb.emit(relax.op.add(y, self.vars[bias]))
        return y

    def build(self, bb: relax.BlockBuilder | None = None):
        cfg = self.cfg
        bb = bb or relax.BlockBuilder()
        t, p = tirx.Var("T", "int64"), tirx.Var("P", "int64")
        tokens = relax.Var("tokens", relax.TensorType((t,), "int32"))
        past = [relax.Var(f"past_{kind}_{i}", relax.TensorType((cfg.num_kv_heads, p, cfg.head_dim), "float32"))
                for i in range(cfg.num_layers) for kind in ("k", "v")]
        with bb.function("prefill", [tokens] + past + list(self.vars.values())):
            with bb.dataflow():
                x = self.linear.embed(bb, tokens, self.params.entries["embed.weight"], self.vars)
                presents = []
                for i in range(cfg.num_layers):
                    x, pk, pv = self._layer(bb, i, x, past[2 * i], past[2 * i + 1], p)
                    presents += [pk, pv]
                last = bb.emit_te(te_ops.last_row, x)
                h = self._rms(bb, last, "norm.weight")
                head = "embed.weight" if cfg.tie_embeddings else "lm_head.weight"
                logits = DecodeBuilder._lin(self, bb, h, head)
                out = bb.emit_output(relax.Tuple([logits] + presents))
            bb.emit_func_output(out)
        return bb.get()

    def _layer(self, bb, i, x, past_k, past_v, p):
        cfg = self.cfg
        pre = f"layers.{i}"
        rows = x.ty.shape[0]
        h = self._rms(bb, x, f"{pre}.attn_norm.weight")
        q = self._lin(bb, h, f"{pre}.attn.q_proj.weight")
        k = self._lin(bb, h, f"{pre}.attn.k_proj.weight")
        v = self._lin(bb, h, f"{pre}.attn.v_proj.weight")
        if cfg.qk_norm == "full":
            q, k = self._rms(bb, q, f"{pre}.attn.q_norm.weight"), self._rms(bb, k, f"{pre}.attn.k_norm.weight")
        if cfg.qk_norm == "head":
            q = bb.emit(relax.op.reshape(q, (rows * cfg.num_heads, cfg.head_dim)))
            k = bb.emit(relax.op.reshape(k, (rows * cfg.num_kv_heads, cfg.head_dim)))
            q, k = self._rms(bb, q, f"{pre}.attn.q_norm.weight"), self._rms(bb, k, f"{pre}.attn.k_norm.weight")
        q = bb.emit(relax.op.reshape(q, (rows, cfg.num_heads, cfg.head_dim)))
        k = bb.emit(relax.op.reshape(k, (rows, cfg.num_kv_heads, cfg.head_dim)))
        v = bb.emit(relax.op.reshape(v, (rows, cfg.num_kv_heads, cfg.head_dim)))
        q = bb.emit_te(te_ops.rope_rows, q, p, cfg.rope_theta)
        k = bb.emit_te(te_ops.rope_rows, k, p, cfg.rope_theta)
        keys = bb.emit(relax.op.concat([past_k, relax.op.permute_dims(k, [1, 0, 2])], axis=1))
        values = bb.emit(relax.op.concat([past_v, relax.op.permute_dims(v, [1, 0, 2])], axis=1))
        q = bb.emit(relax.op.multiply(q, relax.const(np.float32(1.0 / math.sqrt(cfg.head_dim)))))
        scores = bb.emit_te(te_ops.causal_scores, q, keys)
        probs = bb.emit(relax.op.nn.softmax(scores, axis=-1))
        attn = bb.emit_te(te_ops.causal_values, probs, values)
        attn = bb.emit(relax.op.reshape(attn, (rows, cfg.num_heads * cfg.head_dim)))
        x = bb.emit(relax.op.add(x, self._lin(bb, attn, f"{pre}.attn.o_proj.weight")))
        h = self._rms(bb, x, f"{pre}.mlp_norm.weight")
        y = self._swiglu(bb, h, f"{pre}.mlp") if i in cfg.dense_layers else self._moe(bb, i, h)
        return bb.emit(relax.op.add(x, y)), keys, values

    def _moe(self, bb, i, h):
        cfg = self.cfg
        pre = f"layers.{i}.mlp"
        rows, top_k = h.ty.shape[0], cfg.top_k
        pairs = rows * top_k
        probs = bb.emit(relax.op.nn.softmax(self._lin(bb, h, f"{pre}.router.weight"), axis=-1))
        topk = bb.emit(relax.op.topk(probs, top_k, axis=-1, ret_type="both", dtype="int32"))
        weights = bb.emit(relax.TupleGetItem(topk, 0))                                   # [T, k]
        if cfg.norm_topk_prob:
            weights = bb.emit(relax.op.divide(weights, relax.op.sum(weights, axis=-1, keepdims=True)))
        idx = bb.emit(relax.op.reshape(relax.TupleGetItem(topk, 1), (pairs,)))         # pair = t*k + slot
        classes = self.params.class_of[i]
        cls_of = bb.emit(relax.op.take(relax.const(classes, "int32"), idx, axis=0, mode="clip"))
        in_cls = bb.emit(relax.op.take(relax.const(self.params.remap[i], "int32"), idx, axis=0, mode="clip"))
        token_of = bb.emit(relax.op.floor_divide(relax.op.arange(0, pairs, 1, "int32"),
                                                 relax.const(np.int32(top_k))))
        y = None
        for c in sorted(set(classes.tolist())):
            count = int((classes == c).sum())
            key = bb.emit(relax.op.where(relax.op.equal(cls_of, relax.const(np.int32(c))), in_cls,
                                         relax.const(np.int32(count))))
            order = bb.emit(relax.op.argsort(key, axis=0, dtype="int32"))               # sorted -> pair
            below = relax.op.less(relax.op.reshape(key, (pairs, 1)),
                                  relax.const(np.arange(count + 1, dtype=np.int32).reshape(1, -1)))
            offsets = bb.emit(relax.op.sum(relax.op.astype(below, "int32"), axis=0))    # [count + 1]
            xs = bb.emit(relax.op.take(h, relax.op.take(token_of, order, axis=0, mode="clip"), axis=0, mode="clip"))
            name = f"layers.{i}.experts.b{c}"
            g1, g3 = (self.linear.grouped(bb, xs, self.params.entries[f"{name}.{w}"], self.vars,
                                          f"{name}.{w}", offsets) for w in ("w1", "w3"))
            act = bb.emit(relax.op.multiply(relax.op.nn.silu(g1), g3))
            out = self.linear.grouped(bb, act, self.params.entries[f"{name}.w2"], self.vars, f"{name}.w2", offsets)
            # rows past offsets[count] belong to other classes: never written by the kernel
            valid = relax.op.less(relax.op.arange(0, pairs, 1, "int32"),
                                  relax.op.take(offsets, relax.const(np.array([count], np.int32)), axis=0, mode="clip"))
            out = bb.emit(relax.op.where(relax.op.reshape(valid, (pairs, 1)), out, relax.const(np.float32(0))))
            back = bb.emit(relax.op.argsort(order, axis=0, dtype="int32"))              # pair -> sorted
            out = bb.emit(relax.op.take(out, back, axis=0, mode="clip"))
            y = out if y is None else bb.emit(relax.op.add(y, out))
        y = bb.emit(relax.op.reshape(y, (rows, top_k, cfg.hidden_size)))
        y = bb.emit(relax.op.sum(relax.op.multiply(y, relax.op.reshape(weights, (rows, top_k, 1))), axis=1))
        if cfg.shared_intermediate:
            s = self._swiglu(bb, h, f"{pre}.shared")
            if cfg.shared_gate:
                s = bb.emit(relax.op.multiply(relax.op.sigmoid(self._lin(bb, h, f"{pre}.shared_gate.weight")), s))
            y = bb.emit(relax.op.add(y, s))
        return y
