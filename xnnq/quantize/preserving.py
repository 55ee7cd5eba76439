"""Range-preserving ops: one table for the plan (torch.fx nodes) and the ONNX passes (op types).

An op is range-preserving when its output values are input values (or zeros): the tensor keeps its
quantizer's grid through it, so the plan gives it no quantizer of its own and a weight layer behind it
takes its input scale from the quantizer before it. Each row names the op's torch forms and the ONNX
ops it is exported as (``tests/test_preserving.py`` exports every torch form and checks the ONNX column).

Pooling by maximum also returns input values, but it is not in the table: the plan gives it its own
quantizer (a range that tracks its smaller output), and the ONNX side follows the plan.
"""

from __future__ import annotations

import operator
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from ..layers.shape_ops import ChannelShuffle, Pad, Reshape, Slice


@dataclass(frozen=True)
class PreservingOp:
    """One range-preserving op in its torch forms and its ONNX form."""

    name: str
    modules: tuple[type[nn.Module], ...] = ()
    methods: tuple[str, ...] = ()
    functions: tuple[object, ...] = ()
    onnx: tuple[str, ...] = ()


PRESERVING_OPS: tuple[PreservingOp, ...] = (
    PreservingOp(
        "flatten / reshape",
        (nn.Flatten, nn.Unflatten, Reshape),
        ("flatten", "unflatten", "view", "reshape"),
        (torch.flatten, torch.reshape),
        ("Flatten", "Reshape"),
    ),
    PreservingOp("index / slice", (Slice,), (), (operator.getitem,), ("Slice", "Gather", "Squeeze")),
    PreservingOp("split", (), ("chunk", "split"), (torch.chunk, torch.split), ("Split", "Slice")),
    PreservingOp(
        "transpose", (), ("transpose", "permute", "t"), (torch.transpose, torch.permute), ("Transpose",)
    ),
    PreservingOp(
        "squeeze", (), ("squeeze", "unsqueeze"), (torch.squeeze, torch.unsqueeze), ("Squeeze", "Unsqueeze")
    ),
    PreservingOp("pad", (Pad,), (), (), ("Pad",)),
    PreservingOp("expand", (), ("expand",), (), ("Expand",)),
    PreservingOp("repeat", (), ("repeat",), (), ("Tile",)),
    PreservingOp(
        "channel shuffle",
        (nn.ChannelShuffle, ChannelShuffle),
        (),
        (torch.nn.functional.channel_shuffle, torch.nn.functional.native_channel_shuffle),
        ("Reshape", "Transpose"),
    ),
    PreservingOp(
        "identity / dropout",
        (nn.Identity, nn.Dropout, nn.Dropout2d),
        ("contiguous",),
        (torch.nn.functional.dropout,),
        ("Identity", "Dropout"),
    ),
    # shape queries: their results are not tensors and are never quantized; no ONNX value op
    PreservingOp("shape query", (), ("size", "dim"), (getattr,), ()),
)

PRESERVING_MODULES: tuple[type[nn.Module], ...] = tuple(m for op in PRESERVING_OPS for m in op.modules)
PRESERVING_METHODS: frozenset[str] = frozenset(m for op in PRESERVING_OPS for m in op.methods)
PRESERVING_FUNCTIONS: frozenset[object] = frozenset(f for op in PRESERVING_OPS for f in op.functions)
PRESERVING_ONNX_OPS: frozenset[str] = frozenset(o for op in PRESERVING_OPS for o in op.onnx)


def stochastic_depth_modules() -> tuple[type[nn.Module], ...]:
    """torchvision's ``StochasticDepth`` when torchvision is loaded (a model holding one has loaded it): the
    identity in inference, like dropout, so range-preserving as dropout is. The tracer keeps it a leaf module
    so that it follows ``train()``/``eval()``: traced through, the ``self.training`` its forward reads would
    be frozen into the graph as a constant (dropping residual branches at random in eval and export)."""
    cls = getattr(sys.modules.get("torchvision.ops"), "StochasticDepth", None)
    return (cls,) if isinstance(cls, type) else ()


def is_preserving(gm: fx.GraphModule, n: fx.Node, values: dict[fx.Node, Any] | None = None) -> bool:
    """Whether graph node ``n`` is a range-preserving op (see the module docstring).

    With the nodes' example ``values``: an element of a tuple that a non-preserving op returned (the values
    of ``torch.max(x, dim)``, ``topk``, a leaf module's outputs) is where that tensor first appears, so
    taking it (``[0]``, ``.values``) is not range-preserving; an element of ``split`` / ``chunk`` is.
    """
    if n.op == "call_module":
        m = gm.get_submodule(n.target)
        return isinstance(m, PRESERVING_MODULES) or isinstance(m, stochastic_depth_modules())
    if n.op == "call_method":
        return n.target in PRESERVING_METHODS
    if n.op == "call_function":
        if n.target in (operator.getitem, getattr) and values is not None and isinstance(n.args[0], fx.Node):
            src = n.args[0]
            if not isinstance(values.get(src), torch.Tensor) and not is_preserving(gm, src, values):
                return False
        return n.target in PRESERVING_FUNCTIONS
    return False


def value_source(gm: fx.GraphModule, n: fx.Node, values: dict[fx.Node, Any] | None = None) -> fx.Node:
    """Walk up range-preserving nodes to the node that produced the values of ``n`` (``values``: as in
    :func:`is_preserving`)."""
    while is_preserving(gm, n, values) and n.args and isinstance(n.args[0], fx.Node):
        n = n.args[0]
    return n
