"""Small helpers over an ONNX graph: producers, consumers, initializers, renaming, node-type counts."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from ..quantize.preserving import PRESERVING_ONNX_OPS


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output}


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def initializers(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in graph.initializer}


def const_value(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    """The value of an initializer or a ``Constant`` node output, else None."""
    for t in graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    for n in graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return numpy_helper.to_array(n.attribute[0].t)
    return None


def clip_bounds(graph: onnx.GraphProto, node: onnx.NodeProto) -> tuple[float, float]:
    """(min, max) of a ``Clip`` node (inputs of opset >= 11; missing bounds are ±inf)."""
    lo = const_value(graph, node.input[1]) if len(node.input) > 1 and node.input[1] else None
    hi = const_value(graph, node.input[2]) if len(node.input) > 2 and node.input[2] else None
    return (float(lo) if lo is not None else -np.inf), (float(hi) if hi is not None else np.inf)


def rename_tensor(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename a tensor everywhere (node inputs/outputs, graph outputs, value_info)."""
    for n in graph.node:
        for i, x in enumerate(n.input):
            if x == old:
                n.input[i] = new
        for i, x in enumerate(n.output):
            if x == old:
                n.output[i] = new
    for coll in (graph.output, graph.value_info):
        for v in coll:
            if v.name == old:
                v.name = new


def op_counts(model: onnx.ModelProto) -> Counter:
    """Node types of the main graph and their counts."""
    return Counter(n.op_type for n in model.graph.node)


def find_source(graph: onnx.GraphProto, tensor: str, wanted: set[str]) -> str | None:
    """Walk up from ``tensor`` through range-preserving ops (the plan's table,
    :mod:`xnnq.quantize.preserving`) to the first tensor in ``wanted``."""
    prod = producers(graph)
    seen = 0
    while tensor not in wanted:
        n = prod.get(tensor)
        if n is None or n.op_type not in PRESERVING_ONNX_OPS or seen > 64:
            return None
        tensor, seen = n.input[0], seen + 1
    return tensor


def constants_to_initializers(model: onnx.ModelProto) -> None:
    """Turn every ``Constant`` node of the main graph into an initializer (TIDL and Netron read those)."""
    graph = model.graph
    keep = []
    for n in graph.node:
        if n.op_type == "Constant" and len(n.attribute) == 1 and n.attribute[0].name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(n.attribute[0].t)
            t.name = n.output[0]
            graph.initializer.append(t)
        else:
            keep.append(n)
    del graph.node[:]
    graph.node.extend(keep)


def drop_unused_initializers(model: onnx.ModelProto) -> None:
    graph = model.graph
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


@dataclass(frozen=True)
class GeluPattern:
    """One erf GELU as torch exports it: ``Mul(Mul(x, Add(Erf(Div(x, √2)), 1)), 0.5)``."""

    input: str
    nodes: tuple[onnx.NodeProto, ...]  # Div, Erf, Add, Mul, Mul
    output: str


def gelu_patterns(graph: onnx.GraphProto) -> list[GeluPattern]:
    """Every erf GELU subgraph of ``graph``: the sequence TIDL maps, as a whole, to one layer (its
    Batchnorm layer with a GELU activation; Erf and that Div are not supported alone) [tidl-vtfr]. The
    constants must be √2, 1 and 0.5 (either operand order), and each inner tensor must have one reader."""
    prod, users = producers(graph), consumers(graph)

    def const_operand(n: onnx.NodeProto, value: float) -> str | None:
        """The other input of the two-input ``n`` when one input is the scalar constant ``value``."""
        if len(n.input) != 2:
            return None
        for i in (0, 1):
            v = const_value(graph, n.input[i])
            if v is not None and v.size == 1 and abs(float(v.reshape(())) - value) <= 1e-5 * max(1.0, value):
                return n.input[1 - i]
        return None

    def only_user(t: str, op: str) -> onnx.NodeProto | None:
        u = users.get(t, [])
        return u[0] if len(u) == 1 and u[0].op_type == op else None

    found = []
    for erf in graph.node:
        if erf.op_type != "Erf":
            continue
        div = prod.get(erf.input[0])
        if div is None or div.op_type != "Div" or len(users.get(div.output[0], [])) != 1:
            continue
        x = div.input[0]
        v = const_value(graph, div.input[1])
        if v is None or v.size != 1 or abs(float(v.reshape(())) - math.sqrt(2.0)) > 1e-4:
            continue
        add = only_user(erf.output[0], "Add")
        mul = only_user(add.output[0], "Mul") if add is not None and const_operand(add, 1.0) else None
        if mul is None or sorted(mul.input) != sorted([x, add.output[0]]):
            continue
        half = only_user(mul.output[0], "Mul")
        if half is None or const_operand(half, 0.5) != mul.output[0]:
            continue
        found.append(GeluPattern(x, (div, erf, add, mul, half), half.output[0]))
    return found
