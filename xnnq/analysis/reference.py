"""The float reference: :meth:`QuantBaseModule.float_reference` — the user's float model traced and put
through the same surgery as the wrapper — has the node names of the quantized graph (same trace, same
surgery, before any quantizer is inserted), so every quantized activation of the plan has a float
counterpart, the plan's ``ActSpot.tensor``:

* ``replace`` spot (a ReLU became a PACT2): the float ReLU's output;
* ``after`` spot: the output of the node it follows (for a conv folded with BatchNorm: the BN output);
* ``before`` spot (input of a weight layer): the value that enters that layer;
* the network input: the input itself.

:class:`NodeTap` runs the float graph with ``torch.fx.Interpreter`` and keeps only the requested node
outputs, so it also reaches values of ``call_function`` nodes that have no module to hook.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import fx


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
