"""The primitive op set every layer block is written against; torch, ONNX and Relax each implement it.

A block (``moec.arch.blocks``) calls only these methods, so one definition yields the torch
reference (``moec.models.torch_ops``), the ONNX graph (``moec.export.onnx_ops``) and the Relax
decode/prefill functions (``moec.lower.relax_ops``). Values are opaque backend handles (torch
tensors, ONNX value names, Relax vars). Layout is the backend's business: torch carries a batch
axis (``[B, T, H]``), ONNX and Relax do not (``[T, H]``); "heads" values put the head axis just
before the last one. Weights are named relative to the current block (``ops.linear(x, "q_proj")``
reads ``<block>.q_proj.weight`` and its bias if the model has one); :meth:`Ops.block` enters a
sub-block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

Value = Any


@dataclass
class Routing:
    """What a router chose: full probabilities ``[.., E]``, top-k gate weights and expert ids ``[.., k]``."""

    probs: Value
    weights: Value
    ids: Value


class Ops(Protocol):
    """Primitive ops of a decoder; implemented once per backend (see the module docstring)."""

    # -- structure -----------------------------------------------------------------------
    def block(self, name: str, fn: Callable[..., Value], *args: Any) -> Value:
        """Run block ``fn(ops, *args)`` with weights under ``name`` (relative to this block)."""

    def output_rows(self, x: Value) -> Value:
        """The rows whose logits the graph returns (all of them, or the last one in prefill)."""

    # -- weights -------------------------------------------------------------------------
    def embed(self, ids: Value, name: str) -> Value:
        """Rows of embedding ``name`` for token ids ``ids``."""

    def linear(self, x: Value, name: str) -> Value:
        """``x @ W.T (+ b)`` with weight ``name`` in whatever form the plan stored it."""

    def rms_norm(self, x: Value, name: str) -> Value:
        """RMSNorm over the last axis with weight ``name`` (the model's epsilon)."""

    def layer_norm(self, x: Value, name: str) -> Value:
        """LayerNorm over the last axis with weight and bias ``name`` (the model's epsilon)."""

    # -- attention -----------------------------------------------------------------------
    def split_heads(self, x: Value, heads: int, head_dim: int) -> Value:
        """``[.., heads * head_dim]`` -> heads ``[.., heads, head_dim]``."""

    def rope(self, x: Value) -> Value:
        """Half-rotation RoPE of heads ``x`` at the positions of this call's tokens."""

    def attend(self, q: Value, k: Value, v: Value, layer: int, scale: float, window: int = 0,
               sinks: str | None = None) -> Value:
        """Causal attention of query heads over layer ``layer``'s cache plus ``k``/``v``.

        Appends ``k``/``v`` to the cache; query head ``h`` reads kv head ``h // (q_heads //
        kv_heads)`` (GQA); returns the merged heads ``[.., q_heads * v_head_dim]``. ``window`` > 0:
        a query sees only itself and the ``window - 1`` keys before it. ``sinks``: name of a per-head
        logit vector ``[q_heads]`` that joins each softmax denominator (a key with no value).
        """

    def slice_last(self, x: Value, start: int, stop: int) -> Value:
        """``x[..., start:stop]`` (heads stay heads)."""

    def concat_last(self, a: Value, b: Value) -> Value:
        """``a`` and ``b`` joined along the last axis (same leading shape)."""

    def head_linear(self, x: Value, name: str) -> Value:
        """Per-head projection: heads ``x [.., heads, in]`` times float ``name.weight [heads, out, in]``."""

    def merge_heads(self, x: Value) -> Value:
        """Heads ``[.., heads, head_dim]`` -> ``[.., heads * head_dim]``."""

    # -- elementwise and reductions --------------------------------------------------------
    def add(self, a: Value, b: Value) -> Value: ...
    def mul(self, a: Value, b: Value) -> Value: ...
    def div(self, a: Value, b: Value) -> Value: ...
    def silu(self, x: Value) -> Value: ...
    def sigmoid(self, x: Value) -> Value: ...

    def clamp(self, x: Value, low: float | None, high: float | None) -> Value:
        """``x`` limited to ``[low, high]`` (None: unbounded on that side)."""

    def scale(self, x: Value, factor: float) -> Value:
        """``x * factor`` for a constant ``factor``."""

    def add_bias(self, x: Value, name: str) -> Value:
        """``x + <block>.name`` (a float vector over the last axis)."""

    def gather_last(self, x: Value, ids: Value) -> Value:
        """``x[..., ids[..., j]]``: values of ``x`` at indices ``ids`` along the last axis."""

    def softmax(self, x: Value) -> Value:
        """Softmax over the last axis."""

    def topk(self, x: Value, k: int) -> tuple[Value, Value]:
        """Largest ``k`` values along the last axis (descending) and their indices."""

    def keep_top_groups(self, x: Value, groups: int, keep: int, top: int) -> Value:
        """Rows ``[N, E]`` with every expert outside the ``keep`` best of ``groups`` equal groups set to
        ``-inf``; a group's score is the sum of its ``top`` largest values."""

    def jitter_mask(self, x: Value, ref: Value, eps: float) -> Value:
        """``x`` with ``-inf`` wherever ``(ref - x) / max(|x|, ref) > 2 * eps`` (``ref [.., 1]``;
        sparsemixer's "too far below the reference" mask)."""

    def mask_ids(self, x: Value, ids: Value) -> Value:
        """``x`` with ``-inf`` at indices ``ids`` along the last axis."""

    def sum_last(self, x: Value) -> Value:
        """Sum over the last axis, keeping it (size 1)."""

    def mask_experts(self, logits: Value, layer: int) -> Value:
        """Router logits ``[.., E]`` of MoE layer ``layer`` with ``-inf`` at the experts the plan dropped
        (``BitPlan.dropped_experts``), so no top-k ever picks them; ``logits`` itself when none is."""

    # -- mixture of experts ------------------------------------------------------------------
    def routed_experts(self, x: Value, routing: Routing, layer: int) -> Value:
        """``sum_slot weights[t, slot] * expert[ids[t, slot]](x[t])`` with this block's experts.

        Each backend dispatches natively (torch: loop over the chosen experts; ONNX: one ``If``
        per expert; Relax: per bit class, row-guarded GEMVs in decode, grouped GEMMs in prefill),
        running only the experts some token chose.
        """
