"""Build: apply a :class:`Plan` to the graph — PACT2 modules in, conv/linear folded with their BN."""
from __future__ import annotations

import torch.fx as fx
from torch import nn

from ..layers.pact2 import PACT2
from ..layers.quant_weight import QuantConv2d, QuantLinear
from .config import QuantConfig
from .plan import ActSpot, Plan, _source
from .surgery import Change


def build(gm: fx.GraphModule, plan: Plan, report: list[Change], config: QuantConfig) -> None:
    """Insert the quantizers of ``plan`` into ``gm`` (in place), made as ``config`` says."""
    def make(spot: ActSpot) -> PACT2:
        return PACT2(bits=spot.bits, signed=spot.signed, cap=spot.cap, power2=config.power2_activation_range,
                     clip_range=config.clip_ranges.get(spot.name), name=spot.name,
                     observer=config.activation_observer(spot, config))
    nodes = {n.name: n for n in gm.graph.nodes}
    graph = gm.graph

    for spot in plan.acts:
        node = nodes[spot.node]
        if spot.how == "replace":
            old = gm.get_submodule(spot.name)
            owner, _, leaf = spot.name.rpartition(".")
            parent = gm.get_submodule(owner) if owner else gm
            setattr(parent, leaf, make(spot))
            report.append(Change("replace", spot.name, f"{type(old).__name__} -> PACT2(unsigned"
                                 f"{', cap 6' if spot.cap else ''})"))
        elif spot.how == "after":
            gm.add_submodule(spot.name, make(spot))
            users = list(node.users)
            with graph.inserting_after(node):
                q = graph.call_module(spot.name, (node,))
            for u in users:
                u.replace_input_with(node, q)
            report.append(Change("insert", spot.name, f"PACT2 after `{spot.node}` ({spot.reason})"))
        elif spot.how == "before":
            gm.add_submodule(spot.name, make(spot))
            with graph.inserting_before(node):
                q = graph.call_module(spot.name, (node.args[0],))
            node.replace_input_with(node.args[0], q)
            report.append(Change("insert", spot.name, f"PACT2 on the input of `{spot.node}` ({spot.reason})"))

    for w in plan.weights:
        node = next(n for n in graph.nodes if n.op == "call_module" and n.target == w.name)
        float_mod = gm.get_submodule(w.name)
        cls = QuantConv2d if isinstance(float_mod, nn.Conv2d) else QuantLinear
        qmod = cls.from_float(float_mod, bits=w.bits, per_channel=w.per_channel, power2=config.power2_weight_range,
                              constrain_weights=config.constrain_weights, name=w.name)
        owner, _, leaf = w.name.rpartition(".")
        setattr(gm.get_submodule(owner) if owner else gm, leaf, qmod)
        src = _source(gm, node.args[0])
        in_q = src.target if src.op == "call_module" and isinstance(gm.get_submodule(src.target), PACT2) else None
        with graph.inserting_before(node):
            bn_arg = graph.get_attr(w.bn) if w.bn else None
            q_arg = graph.get_attr(in_q) if in_q else None
        node.args = (node.args[0], bn_arg, q_arg)
        if w.bn:
            bn_node = next(n for n in graph.nodes if n.op == "call_module" and n.target == w.bn)
            bn_node.replace_all_uses_with(node)
            graph.erase_node(bn_node)
            report.append(Change("fold", w.name, f"{w.bn} folded on the fly; weights {w.bits}-bit "
                                 f"{'per-channel' if w.per_channel else 'per-tensor'}"))
        else:
            report.append(Change("fold", w.name, f"weights {w.bits}-bit {'per-channel' if w.per_channel else 'per-tensor'}"))
    graph.lint()
    gm.recompile()
