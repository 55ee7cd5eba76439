"""The float reference: the user's float model, traced and put through the same surgery as the wrapper.

After surgery the float graph has the node names of the quantized graph (same trace, same surgery, before
any quantizer is inserted), so every quantized activation of the plan has a float counterpart:

* ``replace`` spot (a ReLU became a PACT2): the float ReLU's output;
* ``after`` spot: the output of the node it follows (for a conv folded with BatchNorm: the BN output);
* ``before`` spot (input of a weight layer): the value that enters that layer;
* the network input: the input itself.

:class:`NodeTap` runs the float graph with ``torch.fx.Interpreter`` and keeps only the requested node
outputs, so it also reaches values of ``call_function`` nodes that have no module to hook.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn

from ..quantize import surgery
from ..quantize.capture import record_values, trace
from ..quantize.plan import ActSpot


def float_graph(float_model: nn.Module, dummy_shapes: list[tuple[int, ...]], device: torch.device,
                leaf_modules: Iterable[str | type] = ()) -> fx.GraphModule:
    """A copy of ``float_model`` traced and converted by the wrapper's surgery (eval mode, on ``device``)."""
    model = copy.deepcopy(float_model).to(device).eval()
    gm = trace(model, leaf_modules)
    dummy = tuple(torch.randn(s, device=device) for s in dummy_shapes)
    surgery.run(gm, record_values(gm, dummy), [])
    return gm.eval()


def float_node_for(gm: fx.GraphModule, spot: ActSpot) -> str | None:
    """Name of the float graph node whose output is the float counterpart of ``spot`` (None: not found)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    node = nodes.get(spot.node)
    if node is None:
        return None
    if spot.how == "before":
        src = node.args[0] if node.args else None
        return src.name if isinstance(src, fx.Node) else None
    return node.name


class NodeTap(fx.Interpreter):
    """Run a GraphModule and keep the outputs of the nodes named in ``wanted`` (``.values``)."""

    def __init__(self, gm: fx.GraphModule, wanted: Iterable[str]):
        super().__init__(gm)
        self.wanted = set(wanted)
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.wanted and isinstance(out, torch.Tensor):
            self.values[n.name] = out.detach()
        return out

    @torch.no_grad()
    def capture(self, *args: torch.Tensor) -> tuple[Any, dict[str, torch.Tensor]]:
        """(model output, {node name: tensor}) for one batch."""
        self.values = {}
        out = self.run(*args)
        return out, self.values
