"""GraphBuilder: a small onnx.helper wrapper that names nodes, shares constants and tags node metadata."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

import numpy as np
from onnx import GraphProto, NodeProto, TensorProto, ValueInfoProto, helper, numpy_helper

OPSET = 21          # default domain: blocked DequantizeLinear, ScatterND reduction, BitwiseAnd
MS_DOMAIN = "com.microsoft"
MS_OPSET = 1


class WeightStore:
    """Weight arrays shared by every graph of one export (written once to the external data file)."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}

    def add(self, name: str, array: np.ndarray) -> str:
        if name in self.arrays:
            raise ValueError(f"weight initializer '{name}' added twice")
        self.arrays[name] = np.ascontiguousarray(array)
        return name

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


class GraphBuilder:
    """Accumulates the nodes of one (sub)graph.

    Constants become initializers of the *root* graph (If branches read them from the outer
    scope), deduplicated by value. ``with gb.meta(layer=0, expert=3):`` tags every node created
    inside with ``metadata_props``; ``with gb.name_scope("L0.E3"):`` prefixes node names.
    """

    def __init__(self, store: WeightStore, _root: "GraphBuilder | None" = None) -> None:
        self.store = store
        self.nodes: list[NodeProto] = []
        self._root = _root or self
        if _root is None:
            self._counter = itertools.count()
            self._consts: dict[tuple, str] = {}
            self.const_tensors: list[TensorProto] = []
        self._meta: dict[str, str] = {}
        self._scope = ""

    # -- names and scopes --------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        return f"{self._scope}{hint}_{next(self._root._counter)}"

    @contextlib.contextmanager
    def meta(self, **props) -> Iterator[None]:
        saved = self._meta
        self._meta = {**saved, **{k: str(v) for k, v in props.items()}}
        try:
            yield
        finally:
            self._meta = saved

    @contextlib.contextmanager
    def name_scope(self, prefix: str) -> Iterator[None]:
        saved = self._scope
        self._scope = f"{saved}{prefix}."
        try:
            yield
        finally:
            self._scope = saved

    # -- nodes -------------------------------------------------------------------------
    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", outputs: list[str] | None = None,
           **attrs) -> str | list[str]:
        """Append a node; returns its output name (or names when ``n_out > 1``)."""
        outs = outputs or [self.fresh(op_type.lower()) for _ in range(n_out)]
        node = helper.make_node(op_type, inputs, outs, name=self.fresh(op_type), domain=domain or None, **attrs)
        for k, v in self._meta.items():
            node.metadata_props.add(key=k, value=v)
        self.nodes.append(node)
        return outs[0] if len(outs) == 1 else outs

    def const(self, value, dtype=None) -> str:
        """A (deduplicated) constant initializer in the root graph."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        root = self._root
        if key not in root._consts:
            name = f"const_{len(root._consts)}"
            root._consts[key] = name
            root.const_tensors.append(numpy_helper.from_array(arr, name))
        return root._consts[key]

    def i64(self, *values: int) -> str:
        """1-D int64 constant (shapes, axes, indices)."""
        return self.const(np.array(values, dtype=np.int64))

    def scalar_i64(self, value: int) -> str:
        return self.const(np.array(value, dtype=np.int64))

    def f32(self, value: float) -> str:
        return self.const(np.array(value, dtype=np.float32))

    def branch(self) -> "GraphBuilder":
        """A builder for an If/Loop body sharing this graph's names, constants, scope and metadata."""
        sub = GraphBuilder(self.store, _root=self._root)
        sub._meta, sub._scope = dict(self._meta), self._scope
        return sub

    def to_graph(self, name: str, inputs: list[ValueInfoProto], outputs: list[ValueInfoProto],
                 initializers: list[TensorProto] | None = None) -> GraphProto:
        return helper.make_graph(self.nodes, name, inputs, outputs, initializer=initializers or [])


def tensor_info(name: str, elem_type: int, shape: list) -> ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, shape)


FLOAT = TensorProto.FLOAT
INT64 = TensorProto.INT64
