"""Small helpers over an ONNX graph: producers, consumers, initializers, renaming, node-type counts."""

from __future__ import annotations

from collections import Counter

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
