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
from .config import QuantConfig
from .preserving import is_preserving, value_source


@dataclass
class ActSpot:
    """One quantized activation tensor."""

    name: str  # module path of its PACT2
    node: str  # graph node whose output it quantizes (or the ReLU it replaces)
    how: str  # "replace" (a ReLU/ReLU6), "after" a node, or "before" a weight layer's input
    reason: str  # "input", "ReLU", "ReLU6", "Conv2d+BN", "AddBlock", "output", ...
    layer: str  # the layer whose output this is (for overrides and the 16-bit lists)
    signed: bool | None = None  # None: decided from the data (the quantizer's ``data_signed``)
    cap: float | None = None
    bits: int = 8
    power2: bool = True  # power-of-2 scale
    tensor: str = ""  # graph node (after surgery) whose output value it quantizes: the float counterpart


@dataclass
class WeightSpot:
    """One conv/linear layer whose (folded) weights are quantized."""

    name: str  # module path of the conv/linear (unchanged)
    bn: str | None  # module path of the folded BatchNorm
    kind: str  # "Conv2d" / "Linear"
    depthwise: bool
    bits: int = 8
    per_channel: bool = False
    power2: bool = True  # power-of-2 scale
    input_quant: str | None = None  # the ActSpot quantizing its input (its scale is the bias grid's)
    output_quant: str | None = None  # the ActSpot right after it (TIDL names the layer by that tensor)


@dataclass
class Plan:
    """Every quantized tensor of a model: what the build makes and the export, calibration and analysis read."""

    acts: list[ActSpot] = field(default_factory=list)
    weights: list[WeightSpot] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"activations": [asdict(a) for a in self.acts], "weights": [asdict(w) for w in self.weights]}

    def act(self, name: str) -> ActSpot:
        """The activation spot of quantizer ``name``."""
        spot = next((a for a in self.acts if a.name == name), None)
        if spot is None:
            raise KeyError(f"{name!r} is not an activation quantizer of the plan")
        return spot

    def weight(self, name: str) -> WeightSpot:
        """The weight spot of layer ``name``."""
        spot = next((w for w in self.weights if w.name == name), None)
        if spot is None:
            raise KeyError(
                f"{name!r} is not a quantized weight layer; weight layers: "
                f"{', '.join(w.name for w in self.weights)}"
            )
        return spot

    def sixteen_bit_layers(self) -> list[str]:
        return sorted(
            {w.name for w in self.weights if w.bits == 16} | {a.layer for a in self.acts if a.bits == 16}
        )


RELU_LIKE = (nn.ReLU, nn.ReLU6)
WEIGHT_LAYERS = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


def is_weight_layer(m: nn.Module, node: fx.Node) -> bool:
    """``node`` calls ``m`` as a layer whose weights the plan quantizes: a Conv2d, a Linear, or a ConvTranspose2d
    with ``groups=1`` (TIDL's deconvolution takes no other; docs/README_tidl.md) called on its input alone (a
    call with ``output_size=`` stays float)."""
    if not isinstance(m, WEIGHT_LAYERS):
        return False
    if isinstance(m, nn.ConvTranspose2d):
        return m.groups == 1 and len(node.args) == 1 and not node.kwargs
    return True


BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def float_weight_modules(gm: fx.GraphModule, plan: Plan, skip: set[str]) -> list[tuple[str, str, list[str]]]:
    """``(name, type, parameter names)`` of each module the graph calls whole whose parameters include a matrix
    or a kernel (two or more dimensions) that no weight spot of ``plan`` quantizes: torch modules other than
    Conv2d / ConvTranspose2d / Linear (Conv1d, MultiheadAttention, TransformerEncoderLayer, LSTM, a grouped
    ConvTranspose2d...), which run in float; and ``(node, function, parameter names)`` of each call given such
    a parameter of a :data:`FUNCTIONAL_LAYERS` function or of a function torch.fx does not look into (one
    ``torch.fx.wrap`` made a leaf, e.g. torchvision's ``shifted_window_attention``). ``skip``: module names
    left out (the user's ``leaf_modules``, chosen knowingly)."""
    quantized = {w.name for w in plan.weights}
    out = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target not in quantized and node.target not in skip:
            mod = gm.get_submodule(node.target)
            names = [n for n, p in mod.named_parameters() if p.dim() >= 2]
            if names:
                out.append((node.target, type(mod).__name__, names))
        elif node.op == "call_function" and (
            node.target in FUNCTIONAL_LAYERS or is_opaque_function(node.target)
        ):
            names = [
                a.target
                for a in node.all_input_nodes
                if a.op == "get_attr"
                and isinstance(p := operator.attrgetter(a.target)(gm), nn.Parameter)
                and p.dim() >= 2
            ]
            if names:
                out.append((node.name, getattr(node.target, "__name__", str(node.target)), names))
    return out


# functionals that apply a weight: a parameter passed to one is not quantized (only modules are)
FUNCTIONAL_LAYERS = (
    torch.nn.functional.linear,
    torch.nn.functional.conv1d,
    torch.nn.functional.conv2d,
    torch.nn.functional.conv_transpose2d,
    torch.matmul,
    operator.matmul,  # x @ self.weight
    torch.mm,
    torch.bmm,
)

# packages whose functions in a graph are tensor ops (traced through, or one ONNX op each); a function from
# elsewhere in a call_function node is a leaf torch.fx.wrap made, whose inside the graph does not show
TENSOR_OP_PACKAGES = frozenset({"torch", "operator", "_operator", "builtins", "math", "xnnq"})


def is_opaque_function(fn: Any) -> bool:
    """``fn`` (a call_function node's target) is a function the graph calls whole without seeing into it: one
    that ``torch.fx.wrap`` registered, from a package other than :data:`TENSOR_OP_PACKAGES`."""
    module = getattr(fn, "__module__", None) or ""
    return callable(fn) and module.partition(".")[0] not in TENSOR_OP_PACKAGES


def relu_cap(m: nn.Module) -> float | None:
    return 6.0 if isinstance(m, nn.ReLU6) else None


def make_plan(gm: fx.GraphModule, values: dict[fx.Node, Any], config: QuantConfig | None = None) -> Plan:
    """Decide every quantizer (see :class:`ActSpot` / :class:`WeightSpot`) on the graph after surgery."""
    config = config or QuantConfig()
    a_bits, a_pow2 = config.bitwidth_activations, config.power2_activation_range
    plan = Plan()
    quant_of: dict[fx.Node, str] = {}  # node whose output tensor gets a quantizer -> the quantizer
    mods = dict(gm.named_modules())

    def is_tensor(n: fx.Node) -> bool:
        return isinstance(values.get(n), torch.Tensor) and values[n].is_floating_point()

    def relu_user(n: fx.Node) -> fx.Node | None:
        """The ReLU that is the only user of ``n`` (its quantizer quantizes ``n``'s values)."""
        users = list(n.users)
        if len(users) == 1 and users[0].op == "call_module" and isinstance(mods[users[0].target], RELU_LIKE):
            return users[0]
        return None

    def add(n: fx.Node, spot: ActSpot) -> None:
        quant_of[n] = spot.name
        plan.acts.append(spot)

    def add_after(n: fx.Node, reason: str, layer: str) -> None:
        if n not in quant_of:
            base = (n.target if n.op == "call_module" else n.name) + "_q"
            add(n, ActSpot(base, n.name, "after", reason, layer, None, None, a_bits, a_pow2, n.name))

    conv_of_bn: dict[fx.Node, str] = {}  # folded BatchNorm node -> its conv/linear
    out_of: dict[str, fx.Node] = {}  # weight layer -> the node of its output (its BN when folded)
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            if is_tensor(n):
                add(
                    n,
                    ActSpot(
                        "input_q" if n.name in ("x", "input") else f"{n.name}_q",
                        n.name,
                        "after",
                        "input",
                        "input",
                        None,
                        None,
                        a_bits,
                        a_pow2,
                        n.name,
                    ),
                )
        elif n.op == "call_module":
            m = mods[n.target]
            if isinstance(m, RELU_LIKE):
                src = n.args[0]
                layer = src.target if isinstance(src, fx.Node) and src.op == "call_module" else n.target
                if isinstance(src, fx.Node) and src in conv_of_bn:
                    layer = conv_of_bn[src]
                add(
                    n,
                    ActSpot(
                        n.target,
                        n.name,
                        "replace",
                        type(m).__name__,
                        layer,
                        False,
                        relu_cap(m),
                        a_bits,
                        a_pow2,
                        n.name,
                    ),
                )
            elif is_weight_layer(m, n):
                out, bn = n, None
                users = list(n.users)
                if (
                    len(users) == 1
                    and users[0].op == "call_module"
                    and isinstance(mods[users[0].target], BATCHNORMS)
                ):
                    bn = users[0]
                    out = bn
                    conv_of_bn[bn] = n.target
                out_of[n.target] = out
                depthwise = (
                    isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels
                )
                per_ch = config.per_channel_all or (config.per_channel_q == "depthwise" and depthwise)
                plan.weights.append(
                    WeightSpot(
                        n.target,
                        bn.target if bn is not None else None,
                        type(m).__name__,
                        depthwise,
                        config.bitwidth_weights,
                        per_ch,
                        config.power2_weight_range,
                    )
                )
                if relu_user(out) is None:
                    add_after(out, type(m).__name__ + ("+BN" if bn is not None else ""), n.target)
            elif isinstance(m, BATCHNORMS) and n in conv_of_bn:
                continue
            elif is_preserving(gm, n, values):
                continue
            elif is_tensor(n) and relu_user(n) is None:
                add_after(n, type(m).__name__, n.target)
        elif n.op in ("call_function", "call_method"):
            if is_tensor(n) and not is_preserving(gm, n, values) and relu_user(n) is None:
                add_after(n, str(n.target.__name__ if callable(n.target) else n.target), n.name)
        elif n.op == "output":
            outs = n.args[0] if isinstance(n.args[0], (tuple, list)) else (n.args[0],)
            for o in outs:
                if isinstance(o, fx.Node) and is_tensor(o) and value_source(gm, o, values) not in quant_of:
                    src = value_source(gm, o, values)
                    add(
                        src,
                        ActSpot(
                            "output_q" if len(outs) == 1 else f"{src.name}_output_q",
                            src.name,
                            "after",
                            "output",
                            "output",
                            None,
                            None,
                            a_bits,
                            a_pow2,
                            src.name,
                        ),
                    )
    # every weight layer's input must be a quantized tensor; its quantizer and the one after it are recorded
    for w in plan.weights:
        node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == w.name)
        src = value_source(gm, node.args[0], values)
        if src in quant_of:
            w.input_quant = quant_of[src]
        else:
            w.input_quant = f"{w.name}_input_q"
            plan.acts.append(
                ActSpot(
                    w.input_quant,
                    node.name,
                    "before",
                    "weight-layer input",
                    src.name if src.op != "call_module" else src.target,
                    None,
                    None,
                    a_bits,
                    a_pow2,
                    node.args[0].name,
                )
            )
        out = out_of[w.name]
        relu = relu_user(out)
        w.output_quant = quant_of.get(relu if relu is not None else out)
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
