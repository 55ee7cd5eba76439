"""Quantization plan: for every tensor TIDL quantizes, where it is, its bitwidth, signedness and source.

The plan is data computed once from the graph after surgery; building the modules, the export (its
16-bit lists and range table) and the analysis all read it instead of re-deriving it from module types.
"""
from __future__ import annotations

import fnmatch
import operator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..layers.fake_quant import check_bits
from ..layers.shape_ops import Pad, Reshape, Slice
from .config import QuantConfig


@dataclass
class ActSpot:
    """One quantized activation tensor."""

    name: str                 # module path of its PACT2
    node: str                 # graph node whose output it quantizes (or the ReLU it replaces)
    how: str                  # "replace" (a ReLU/ReLU6), "after" a node, or "before" a weight layer's input
    reason: str               # "input", "ReLU", "ReLU6", "Conv2d+BN", "AddBlock", "output", ...
    layer: str                # the layer whose output this is (for overrides and the 16-bit lists)
    signed: bool | None = None
    cap: float | None = None
    bits: int = 8


@dataclass
class WeightSpot:
    """One conv/linear layer whose (folded) weights are quantized."""

    name: str                 # module path of the conv/linear (unchanged)
    bn: str | None            # module path of the folded BatchNorm
    kind: str                 # "Conv2d" / "Linear"
    depthwise: bool
    bits: int = 8
    per_channel: bool = False


@dataclass
class Plan:
    acts: list[ActSpot] = field(default_factory=list)
    weights: list[WeightSpot] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"activations": [asdict(a) for a in self.acts], "weights": [asdict(w) for w in self.weights]}

    def act(self, name: str) -> ActSpot:
        return next(a for a in self.acts if a.name == name)

    def sixteen_bit_layers(self) -> list[str]:
        return sorted({w.name for w in self.weights if w.bits == 16} | {a.layer for a in self.acts if a.bits == 16})


RELU_LIKE = (nn.ReLU, nn.ReLU6)
WEIGHT_LAYERS = (nn.Conv2d, nn.Linear)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
PRESERVING_MODULES = (nn.Flatten, Reshape, Slice, Pad, nn.Dropout, nn.Dropout2d, nn.Identity, nn.Unflatten,
                      nn.ChannelShuffle)
PRESERVING_METHODS = {"contiguous", "transpose", "permute", "view", "reshape", "flatten", "chunk", "split",
                      "squeeze", "unsqueeze", "expand", "repeat", "size", "dim", "t"}
PRESERVING_FUNCTIONS = {operator.getitem, torch.transpose, torch.permute, torch.flatten, torch.chunk, torch.split,
                        torch.squeeze, torch.unsqueeze, torch.reshape, torch.nn.functional.dropout, getattr}


def relu_cap(m: nn.Module) -> float | None:
    return 6.0 if isinstance(m, nn.ReLU6) else None


def is_preserving(gm: fx.GraphModule, n: fx.Node) -> bool:
    """Range-preserving: the output values are input values (or zeros), on the input's grid."""
    if n.op == "call_module":
        return isinstance(gm.get_submodule(n.target), PRESERVING_MODULES)
    if n.op == "call_method":
        return n.target in PRESERVING_METHODS
    if n.op == "call_function":
        return n.target in PRESERVING_FUNCTIONS
    return False


def _source(gm: fx.GraphModule, n: fx.Node) -> fx.Node:
    """Walk up range-preserving nodes to the node that produced the values."""
    while is_preserving(gm, n) and n.args and isinstance(n.args[0], fx.Node):
        n = n.args[0]
    return n


def make_plan(gm: fx.GraphModule, values: dict[fx.Node, Any], config: QuantConfig | None = None) -> Plan:
    """Decide every quantizer (see :class:`ActSpot` / :class:`WeightSpot`) on the graph after surgery."""
    config = config or QuantConfig()
    bitwidth_weights, bitwidth_activations = config.bitwidth_weights, config.bitwidth_activations
    plan = Plan()
    quantized: set[fx.Node] = set()  # nodes whose output tensor gets a quantizer
    mods = dict(gm.named_modules())

    def is_tensor(n: fx.Node) -> bool:
        return isinstance(values.get(n), torch.Tensor) and values[n].is_floating_point()

    def only_user_is_relu(n: fx.Node) -> bool:
        users = list(n.users)
        return len(users) == 1 and users[0].op == "call_module" and isinstance(mods[users[0].target], RELU_LIKE)

    def add_after(n: fx.Node, reason: str, layer: str, signed: bool | None = None) -> None:
        if n in quantized:
            return
        quantized.add(n)
        base = (n.target if n.op == "call_module" else n.name) + "_q"
        plan.acts.append(ActSpot(base, n.name, "after", reason, layer, signed, None, bitwidth_activations))

    folded_bns: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            if is_tensor(n):
                quantized.add(n)
                plan.acts.append(ActSpot("input_q" if n.name in ("x", "input") else f"{n.name}_q", n.name, "after",
                                         "input", "input", None, None, bitwidth_activations))
        elif n.op == "call_module":
            m = mods[n.target]
            if isinstance(m, RELU_LIKE):
                quantized.add(n)
                src = n.args[0]
                layer = src.target if isinstance(src, fx.Node) and src.op == "call_module" else n.target
                if isinstance(src, fx.Node) and src in folded_bns:
                    layer = src.meta["xnnq_conv"]
                plan.acts.append(ActSpot(n.target, n.name, "replace", type(m).__name__, layer, False, relu_cap(m),
                                         bitwidth_activations))
            elif isinstance(m, WEIGHT_LAYERS):
                out, bn = n, None
                users = list(n.users)
                if len(users) == 1 and users[0].op == "call_module" and isinstance(mods[users[0].target], BATCHNORMS):
                    bn = users[0]
                    out = bn
                    folded_bns.add(bn)
                    bn.meta["xnnq_conv"] = n.target
                depthwise = isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels
                per_ch = config.per_channel_all or (config.per_channel_q == "depthwise" and depthwise)
                plan.weights.append(WeightSpot(n.target, bn.target if bn is not None else None, type(m).__name__,
                                               depthwise, bitwidth_weights, per_ch))
                if not only_user_is_relu(out):
                    add_after(out, type(m).__name__ + ("+BN" if bn is not None else ""), n.target)
            elif isinstance(m, BATCHNORMS) and n in folded_bns:
                continue
            elif is_preserving(gm, n):
                continue
            elif is_tensor(n) and not only_user_is_relu(n):
                add_after(n, type(m).__name__, n.target)
        elif n.op in ("call_function", "call_method"):
            if is_tensor(n) and not is_preserving(gm, n) and not only_user_is_relu(n):
                add_after(n, str(n.target.__name__ if callable(n.target) else n.target), n.name)
        elif n.op == "output":
            outs = n.args[0] if isinstance(n.args[0], (tuple, list)) else (n.args[0],)
            for o in outs:
                if isinstance(o, fx.Node) and is_tensor(o) and _source(gm, o) not in quantized:
                    src = _source(gm, o)
                    quantized.add(src)
                    plan.acts.append(ActSpot("output_q" if len(outs) == 1 else f"{src.name}_output_q", src.name,
                                             "after", "output", "output", None, None, bitwidth_activations))
    # every weight layer's input must be a quantized tensor
    for w in plan.weights:
        node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == w.name)
        src = _source(gm, node.args[0])
        if src not in quantized:
            plan.acts.append(ActSpot(f"{w.name}_input_q", node.name, "before", "weight-layer input", src.name
                                     if src.op != "call_module" else src.target, None, None, bitwidth_activations))
    apply_overrides(plan, config.bitwidth_overrides)
    return plan


def apply_overrides(plan: Plan, overrides: dict[str, int]) -> None:
    """``{"layer name or glob": bits}``; the keys ``"first"`` and ``"last"`` name the first/last weight layer.

    A matched weight layer gets ``bits`` for its weights and for the activation right after it.
    Activation quantizers can also be named directly (``"input_q"``, ``"layer1.0.add_q"``...).
    """
    if not overrides:
        return
    names = [w.name for w in plan.weights]
    for pattern, bits in overrides.items():
        check_bits(bits, f"bitwidth_overrides[{pattern!r}]")
        if pattern == "first":
            pattern = names[0] if names else pattern
        elif pattern == "last":
            pattern = names[-1] if names else pattern
        hit = False
        for w in plan.weights:
            if fnmatch.fnmatchcase(w.name, pattern):
                w.bits, hit = bits, True
        for a in plan.acts:
            if fnmatch.fnmatchcase(a.layer, pattern) or fnmatch.fnmatchcase(a.name, pattern):
                a.bits, hit = bits, True
        if not hit:
            raise ValueError(f"bitwidth_overrides: {pattern!r} matches no layer. Layers: {', '.join(names)}")
