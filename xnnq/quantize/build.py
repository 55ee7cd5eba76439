"""Build: apply a :class:`Plan` to the graph — PACT2 modules in, conv/linear folded with their BN.

A folded layer's graph node calls it as ``layer(x, bn, input_quant)`` (the BatchNorm and the quantizer of
its input as ``get_attr`` arguments, both named by the plan's :class:`~xnnq.quantize.plan.WeightSpot`).
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from ..layers.blocks import AddBlock, MultBlock
from ..layers.pact2 import PACT2
from ..layers.pooling import IndexMaxPool2d
from ..layers.quant_weight import QUANT_WEIGHT_LAYERS, QuantConv2d, QuantConvTranspose2d, QuantLinear
from ..layers.resize import ResizeWith
from ..layers.rounding import Site
from ..layers.tqt import LearnedRange
from .config import QuantConfig
from .plan import ActSpot, Plan
from .surgery import Change


def build(gm: fx.GraphModule, plan: Plan, report: list[Change], config: QuantConfig) -> None:
    """Insert the quantizers of ``plan`` into ``gm`` (in place), made as ``config`` says."""
    nodes = {n.name: n for n in gm.graph.nodes}
    graph = gm.graph

    def make(spot: ActSpot, inplace: bool = False) -> PACT2:
        clip_range = config.clip_ranges.get(spot.name)
        learned = (
            LearnedRange(
                init_batches=config.range_init_batches,
                name=spot.name,
                anchor=config.range_anchor,
                hysteresis=config.range_hysteresis,
            )
            if config.learn_activation_ranges and clip_range is None
            else None
        )
        q = PACT2(
            bits=spot.bits,
            signed=spot.signed,
            cap=spot.cap,
            power2=spot.power2,
            clip_range=clip_range,
            name=spot.name,
            observer=config.activation_observer(spot, config),
            rounding=config.rounding,
            learned_range=learned,
            inplace=inplace,
        )
        # where TIDL rounds differently from a requantization (xnnq.layers.rounding.Site)
        src = gm.get_submodule(nodes[spot.node].target) if nodes[spot.node].op == "call_module" else None
        if spot.reason == "input":
            q.site = Site.INPUT
        elif isinstance(src, ResizeWith) and "linear" in src.mode:
            q.site = Site.RESIZE
        return q

    for spot in plan.acts:
        node = nodes[spot.node]
        if spot.how == "replace":
            old = gm.get_submodule(spot.name)
            owner, _, leaf = spot.name.rpartition(".")
            parent = gm.get_submodule(owner) if owner else gm
            setattr(parent, leaf, make(spot, inplace=bool(getattr(old, "inplace", False))))
            report.append(
                Change(
                    "replace",
                    spot.name,
                    f"{type(old).__name__} -> PACT2(unsigned{', cap 6' if spot.cap else ''})",
                )
            )
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
        cls = _quant_class(float_mod)
        learned = (
            LearnedRange(
                (float_mod.weight.shape[cls.out_axis],) if w.per_channel else (),
                init_batches=config.range_init_batches,
                name=w.name,
                anchor=config.range_anchor,
                hysteresis=config.range_hysteresis,
            )
            if config.learn_weight_ranges
            else None
        )
        qmod = cls.from_float(
            float_mod,
            bits=w.bits,
            per_channel=w.per_channel,
            power2=w.power2,
            constrain_weights=config.constrain_weights,
            name=w.name,
            learned_range=learned,
        )
        owner, _, leaf = w.name.rpartition(".")
        setattr(gm.get_submodule(owner) if owner else gm, leaf, qmod)
        with graph.inserting_before(node):
            bn_arg = graph.get_attr(w.bn) if w.bn else None
            q_arg = graph.get_attr(w.input_quant) if w.input_quant else None
        node.args = (node.args[0], bn_arg, q_arg)
        if w.bn:
            bn_node = next(n for n in graph.nodes if n.op == "call_module" and n.target == w.bn)
            bn_node.replace_all_uses_with(node)
            graph.erase_node(bn_node)
            report.append(
                Change(
                    "fold",
                    w.name,
                    f"{w.bn} folded on the fly; weights {w.bits}-bit "
                    f"{'per-channel' if w.per_channel else 'per-tensor'}",
                )
            )
        else:
            report.append(
                Change(
                    "fold", w.name, f"weights {w.bits}-bit {'per-channel' if w.per_channel else 'per-tensor'}"
                )
            )
    for node in graph.nodes:  # max pools keep their indices, not their input, for the backward
        if node.op == "call_module" and type(gm.get_submodule(node.target)) is nn.MaxPool2d:
            owner, _, leaf = node.target.rpartition(".")
            setattr(
                gm.get_submodule(owner) if owner else gm,
                leaf,
                IndexMaxPool2d.from_float(gm.get_submodule(node.target)),
            )
    _allow_overwrites(gm)
    _allow_sole_reader_reuse(gm)
    graph.lint()
    gm.recompile()


_QUANT_CLASS: dict[type, type] = {
    nn.Conv2d: QuantConv2d,
    nn.ConvTranspose2d: QuantConvTranspose2d,
    nn.Linear: QuantLinear,
}


def _quant_class(mod: nn.Module) -> type:
    """The quantized class of a weight layer of the plan (an ``nn.Conv2d``, ``nn.ConvTranspose2d``, ``nn.Linear``
    or a subclass of one)."""
    return next(q for f, q in _QUANT_CLASS.items() if isinstance(mod, f))


def _fresh_output(node: fx.Node, mod: nn.Module) -> bool:
    """``node``'s output is a tensor of its own whose producer's backward does not read it: a conv/linear
    (with its BN), a sum of two or more tensors, a product of two (a squeeze-excitation gate: its backward
    reads the operands), or an in-place SiLU (whose backward keeps its own copy of the input). Not a
    Sigmoid/ReLU-like op (their backward reads the output) nor anything that may return an alias of its
    input."""
    if isinstance(mod, QUANT_WEIGHT_LAYERS):
        return True
    if isinstance(mod, AddBlock):
        return len(node.args) >= 2
    if isinstance(mod, MultBlock):
        return True
    return type(mod) is nn.SiLU and mod.inplace


def _allow_overwrites(gm: fx.GraphModule) -> None:
    """Let each quantizer whose input is such a fresh output, read by nothing else, overwrite it (the fused
    kernel on CPU then makes no activation-sized tensor; :meth:`PACT2.overwrite_output_of`)."""
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(node.target), PACT2):
            continue
        src = node.args[0] if node.args else None
        if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        producer = gm.get_submodule(src.target)
        if _fresh_output(src, producer):
            gm.get_submodule(node.target).overwrite_output_of(producer)


# element-wise activations whose backward returns a new gradient tensor for their input
_FRESH_GRADIENT_ACTIVATIONS = (nn.SiLU, nn.Hardswish, nn.Sigmoid, nn.Hardsigmoid, nn.GELU, nn.Tanh, nn.Mish)


def _fresh_gradient(mod: nn.Module) -> bool:
    """``mod``'s backward makes a gradient tensor of its own for its first input: a conv/linear (with its BN)
    or an element-wise activation. Not an add (both inputs get the same tensor), a view, a concatenation
    (slices of one tensor) or anything else that may pass its gradient on as it is."""
    return isinstance(mod, QUANT_WEIGHT_LAYERS) or type(mod) in _FRESH_GRADIENT_ACTIVATIONS


def _allow_sole_reader_reuse(gm: fx.GraphModule) -> None:
    """For each quantizer whose output one call reads, as its first operand and nowhere else in the call: let the
    quantizer mask its incoming gradient in place when that reader makes a gradient of its own for it
    (:meth:`PACT2.own_gradient_from`), or let the reader, an add of two or more operands, write its sum into it
    (:meth:`AddBlock.accumulate_into_first`)."""
    for node in gm.graph.nodes:
        if node.op != "call_module" or len(node.users) != 1:
            continue
        q = gm.get_submodule(node.target)
        user = next(iter(node.users))
        if not isinstance(q, PACT2) or user.op != "call_module" or not user.args or user.args[0] is not node:
            continue
        if node in user.args[1:] or node in user.kwargs.values():
            continue
        reader = gm.get_submodule(user.target)
        if _fresh_gradient(reader):
            q.own_gradient_from(reader)
        elif isinstance(reader, AddBlock) and len(user.args) >= 2:
            reader.accumulate_into_first(q)
