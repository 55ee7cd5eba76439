"""Surgery: turn functionals and tensor operators into modules, split re-used modules.

After surgery every op that changes a range is a ``call_module`` node of its own, so the plan can attach a
quantizer to it, and no module object is called twice; a channel shuffle (module or functional), which
torch.onnx cannot export, is a module of reshape-transpose-reshape. Parameter names never change: modules are
only added (under the module whose ``forward`` held the functional), copied (re-used parameter-free modules)
or, when parameter-free (:data:`MODULE_RULES`), replaced under their own name.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..layers.blocks import AddBlock, CatBlock, MultBlock, ReduceMean
from ..layers.resize import ResizeWith
from ..layers.shape_ops import ChannelShuffle, Pad, Reshape, Slice


@dataclass
class Change:
    """One line of the surgery report."""

    kind: str  # "module", "split", "fold", "replace", "insert"
    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.kind:8s} {self.where}: {self.what}"


def _bind(names: list[str], defaults: dict[str, Any], args: tuple, kwargs: dict) -> dict[str, Any]:
    out = dict(defaults)
    out.update(zip(names, args))
    out.update(kwargs)
    return out


def _is_tensor(values: dict, a: Any) -> bool:
    return isinstance(a, fx.Node) and isinstance(values.get(a), torch.Tensor)


def _concrete(values: dict, a: Any) -> Any:
    """Replace non-tensor nodes (sizes computed from shapes) by their recorded values."""
    if isinstance(a, fx.Node):
        return a if _is_tensor(values, a) else values[a]
    if isinstance(a, (tuple, list)):
        return type(a)(_concrete(values, x) for x in a)
    if isinstance(a, slice):
        return slice(_concrete(values, a.start), _concrete(values, a.stop), _concrete(values, a.step))
    return a


# A rule: (names, defaults) of the functional, and a factory(bound args, node value, input value) -> module
_Rule = tuple[list[str], dict[str, Any], Callable[..., nn.Module | None]]


def _hardtanh(p, out, inp):
    lo, hi = float(p["min_val"]), float(p["max_val"])
    return nn.ReLU6() if (lo, hi) == (0.0, 6.0) else nn.Hardtanh(lo, hi)


def _resize(p, out, inp):
    scale = tuple(o / i for o, i in zip(out.shape[2:], inp.shape[2:]))
    return ResizeWith(scale, p["mode"], p["align_corners"])


def _reshape(p, out, inp):
    if out.dim() >= 1 and inp.dim() >= 1 and out.shape[0] == inp.shape[0]:
        return Reshape(tuple(out.shape[1:]))
    return None  # a reshape that mixes the batch dimension is left as it is


FUNCTION_RULES: dict[Any, _Rule] = {
    F.relu: (["input", "inplace"], {}, lambda p, o, i: nn.ReLU()),
    torch.relu: (["input"], {}, lambda p, o, i: nn.ReLU()),
    torch.relu_: (["input"], {}, lambda p, o, i: nn.ReLU()),
    F.relu6: (["input", "inplace"], {}, lambda p, o, i: nn.ReLU6()),
    F.hardtanh: (["input", "min_val", "max_val", "inplace"], {"min_val": -1.0, "max_val": 1.0}, _hardtanh),
    F.hardswish: (["input", "inplace"], {}, lambda p, o, i: nn.Hardswish()),
    F.hardsigmoid: (["input", "inplace"], {}, lambda p, o, i: nn.Hardsigmoid()),
    F.silu: (["input", "inplace"], {}, lambda p, o, i: nn.SiLU()),
    F.gelu: (["input"], {}, lambda p, o, i: nn.GELU()),
    torch.sigmoid: (["input"], {}, lambda p, o, i: nn.Sigmoid()),
    F.sigmoid: (["input"], {}, lambda p, o, i: nn.Sigmoid()),
    torch.tanh: (["input"], {}, lambda p, o, i: nn.Tanh()),
    F.leaky_relu: (
        ["input", "negative_slope", "inplace"],
        {"negative_slope": 0.01},
        lambda p, o, i: nn.LeakyReLU(p["negative_slope"]),
    ),
    F.avg_pool2d: (
        ["input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"],
        {
            "stride": None,
            "padding": 0,
            "ceil_mode": False,
            "count_include_pad": True,
            "divisor_override": None,
        },
        lambda p, o, i: nn.AvgPool2d(
            p["kernel_size"],
            p["stride"],
            p["padding"],
            p["ceil_mode"],
            p["count_include_pad"],
            p["divisor_override"],
        ),
    ),
    F.max_pool2d: (
        ["input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"],
        {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False},
        lambda p, o, i: nn.MaxPool2d(
            p["kernel_size"], p["stride"], p["padding"], p["dilation"], ceil_mode=p["ceil_mode"]
        ),
    ),
    F.adaptive_avg_pool2d: (
        ["input", "output_size"],
        {},
        lambda p, o, i: nn.AdaptiveAvgPool2d(p["output_size"]),
    ),
    F.adaptive_max_pool2d: (
        ["input", "output_size"],
        {},
        lambda p, o, i: nn.AdaptiveMaxPool2d(p["output_size"]),
    ),
    F.interpolate: (
        ["input", "size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias"],
        {"mode": "nearest", "align_corners": None},
        _resize,
    ),
    F.pad: (
        ["input", "pad", "mode", "value"],
        {"mode": "constant", "value": None},
        lambda p, o, i: Pad(p["pad"], p["mode"], p["value"]),
    ),
    torch.flatten: (
        ["input", "start_dim", "end_dim"],
        {"start_dim": 0, "end_dim": -1},
        lambda p, o, i: nn.Flatten(p["start_dim"], p["end_dim"]),
    ),
    torch.reshape: (["input", "shape"], {}, _reshape),
    F.channel_shuffle: (["input", "groups"], {}, lambda p, o, i: ChannelShuffle(p["groups"])),
    F.native_channel_shuffle: (["input", "groups"], {}, lambda p, o, i: ChannelShuffle(p["groups"])),
    torch.mean: (
        ["input", "dim", "keepdim"],
        {"keepdim": False},
        lambda p, o, i: (
            ReduceMean(p["dim"] if isinstance(p["dim"], (tuple, list)) else (p["dim"],), p["keepdim"])
            if "dim" in p
            else None
        ),
    ),
}
METHOD_RULES: dict[str, _Rule] = {
    "relu": FUNCTION_RULES[torch.relu],
    "relu_": FUNCTION_RULES[torch.relu],
    "sigmoid": FUNCTION_RULES[torch.sigmoid],
    "tanh": FUNCTION_RULES[torch.tanh],
    "flatten": (
        ["input", "start_dim", "end_dim"],
        {"start_dim": 0, "end_dim": -1},
        lambda p, o, i: nn.Flatten(p["start_dim"], p["end_dim"]),
    ),
    "view": (["input"], {}, _reshape),
    "reshape": (["input"], {}, _reshape),
    "mean": FUNCTION_RULES[torch.mean],
}
# torch modules torch.onnx cannot export, each replaced (under its own name) by a module of the same values that
# it can; exact types only (a subclass may compute something else)
MODULE_RULES: dict[type[nn.Module], Callable[[Any], nn.Module]] = {
    nn.ChannelShuffle: lambda m: ChannelShuffle(m.groups),
}
ADD_OPS = {operator.add, operator.iadd, torch.add}
MUL_OPS = {operator.mul, operator.imul, torch.mul}
CAT_OPS = {torch.cat, torch.concat}


def _owner(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.keys())[-1] if stack else ""


def _add_module(gm: fx.GraphModule, owner: str, kind: str, module: nn.Module) -> str:
    base = f"{owner}.{kind}" if owner else kind
    existing = dict(gm.named_modules())
    name, i = base, 1
    while name in existing:
        name, i = f"{base}_{i}", i + 1
    gm.add_submodule(name, module)
    return name


def _replace(
    gm: fx.GraphModule,
    node: fx.Node,
    module: nn.Module,
    inputs: list,
    kind: str,
    report: list[Change],
    values: dict,
) -> None:
    desc = f"{type(module).__name__} from {node.op} `{getattr(node.target, '__name__', node.target)}` ({node.name})"
    name = _add_module(gm, _owner(node), kind, module)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(name, tuple(inputs))
    new.meta = dict(node.meta)
    values[new] = values.get(node)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    report.append(Change("module", name, desc))


def _replace_module(gm: fx.GraphModule, node: fx.Node, report: list[Change]) -> None:
    """Swap the module ``node`` calls for its :data:`MODULE_RULES` replacement, under the same name."""
    mod = gm.get_submodule(node.target)
    rule = MODULE_RULES.get(type(mod))
    if rule is None:
        return
    new = rule(mod)
    owner, _, leaf = node.target.rpartition(".")
    setattr(gm.get_submodule(owner) if owner else gm, leaf, new)
    what = f"torch.nn.{type(mod).__name__} -> xnnq.layers.{type(new).__name__} (ops torch.onnx exports)"
    report.append(Change("replace", node.target, what))


def functionals_to_modules(gm: fx.GraphModule, values: dict, report: list[Change]) -> None:
    """Replace functionals and tensor operators by modules, and the modules of :data:`MODULE_RULES` by theirs
    (see module docstring)."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module":
            _replace_module(gm, node, report)
        if node.op not in ("call_function", "call_method"):
            continue
        tgt = node.target
        args = [_concrete(values, a) for a in node.args]
        kwargs = {k: _concrete(values, v) for k, v in node.kwargs.items()}
        out = values.get(node)
        if (
            node.op == "call_function"
            and tgt in ADD_OPS
            or node.op == "call_method"
            and tgt in ("add", "add_")
        ):
            if len(args) == 2 and all(_is_tensor(values, a) for a in args) and not kwargs:
                _replace(gm, node, AddBlock(), args, "add", report, values)
            continue
        if (
            node.op == "call_function"
            and tgt in MUL_OPS
            or node.op == "call_method"
            and tgt in ("mul", "mul_")
        ):
            if len(args) == 2 and all(_is_tensor(values, a) for a in args) and not kwargs:
                _replace(gm, node, MultBlock(), args, "mul", report, values)
            continue
        if node.op == "call_function" and tgt in CAT_OPS:
            p = _bind(["tensors", "dim"], {"dim": 0}, tuple(args), kwargs)
            tensors = list(p["tensors"])
            _replace(gm, node, CatBlock(int(p["dim"])), tensors, "cat", report, values)
            continue
        if node.op == "call_function" and tgt is operator.getitem and _is_tensor(values, node.args[0]):
            index = args[1]
            if not any(isinstance(i, fx.Node) for i in (index if isinstance(index, tuple) else (index,))):
                _replace(gm, node, Slice(index), [args[0]], "slice", report, values)
            continue
        rule = FUNCTION_RULES.get(tgt) if node.op == "call_function" else METHOD_RULES.get(tgt)
        if rule is None or not isinstance(out, torch.Tensor):
            continue
        names, defaults, factory = rule
        p = _bind(names, defaults, tuple(args), kwargs)
        inp = values.get(node.args[0]) if node.args else None
        if not isinstance(inp, torch.Tensor):
            continue
        module = factory(p, out, inp)
        if module is None:
            continue
        kind = type(module).__name__.lower()
        _replace(gm, node, module, [args[0]], kind, report, values)
    gm.graph.eliminate_dead_code()


def _shared_copy(mod: nn.Module) -> nn.Module:
    """A new module object holding the very same parameter and buffer tensors as ``mod`` (weights stay shared)."""
    new = copy.copy(mod)
    new._parameters = dict(mod._parameters)
    new._buffers = dict(mod._buffers)
    new._modules = {k: None if m is None else _shared_copy(m) for k, m in mod._modules.items()}
    return new


def split_reused_modules(gm: fx.GraphModule, report: list[Change]) -> None:
    """Give every call of a re-used module its own module, so each call site gets its own quantizers.

    A parameter-free module (a shared ReLU) is deep-copied; a module with parameters (a head conv shared
    across FPN levels) becomes a second module object holding the same parameter and buffer tensors, so the
    weights stay shared in training while each call's activations are quantized on their own.
    """
    seen: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        count = seen.get(node.target, 0)
        seen[node.target] = count + 1
        if count == 0:
            continue
        mod = gm.get_submodule(node.target)
        shared = any(True for _ in mod.parameters())
        owner, _, leaf = node.target.rpartition(".")
        name = _add_module(gm, owner, leaf, _shared_copy(mod) if shared else copy.deepcopy(mod))
        what = "a copy sharing its parameters and buffers" if shared else "its own copy"
        report.append(Change("split", node.target, f"call #{count + 1} now uses {what} `{name}`"))
        node.target = name


def split_silus(gm: fx.GraphModule, values: dict, report: list[Change]) -> None:
    """Write each SiLU as ``x · σ(x)`` with modules of its own (a ``Sigmoid`` and a ``MultBlock``), so the plan
    quantizes ``σ(x)`` as TIDL does (its Sigmoid and Mul layers, see ``QuantConfig.silu``)."""
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or type(gm.get_submodule(node.target)) is not nn.SiLU:
            continue
        x = node.args[0] if node.args else node.kwargs["input"]
        owner = _owner(node)
        sig_name = _add_module(gm, owner, "sigmoid", nn.Sigmoid())
        mul_name = _add_module(gm, owner, "mul", MultBlock())
        with gm.graph.inserting_before(node):
            sig = gm.graph.call_module(sig_name, (x,))
            mul = gm.graph.call_module(mul_name, (x, sig))
        sig.meta, mul.meta = dict(node.meta), dict(node.meta)
        xv = values.get(x)
        values[sig] = torch.sigmoid(xv) if isinstance(xv, torch.Tensor) else None
        values[mul] = values.get(node)
        node.replace_all_uses_with(mul)
        gm.graph.erase_node(node)
        report.append(Change("module", mul_name, f"SiLU `{node.target}` as x * {sig_name}(x) (σ quantized)"))


def run(gm: fx.GraphModule, values: dict, report: list[Change], split_silu: bool = False) -> None:
    functionals_to_modules(gm, values, report)
    if split_silu:
        split_silus(gm, values, report)
    split_reused_modules(gm, report)
    gm.graph.lint()
    gm.recompile()
