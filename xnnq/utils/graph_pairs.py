"""Find the layer pairs that cross-layer equalization can rescale, on the torch.fx graph of a model.

A pair is ``conv1/linear1 → [BatchNorm] → [activation] → conv2/linear2`` where every intermediate tensor
has exactly one user and the activation is positive-homogeneous (f(x/s) = f(x)/s for s > 0): ReLU,
PReLU, Identity or none. ReLU6 / Hardtanh / clamps are *not* (their clipping level would have to scale
with each channel) and stop a pair. A BatchNorm right after conv2 is recorded too, because the
quantized kernel of conv2 is the BN-folded one.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
HOMOGENEOUS_MODULES = (nn.ReLU, nn.PReLU, nn.Identity)
HOMOGENEOUS_FUNCTIONS = (F.relu, torch.relu)


@dataclass(frozen=True)
class LayerPair:
    """Module paths of an equalizable pair; ``act`` is ``"relu"`` / ``"prelu"`` / ``"identity"`` / ``None``."""

    conv1: str
    bn1: str | None
    act: str | None
    conv2: str
    bn2: str | None


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _act_kind(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """``"relu"``, ``"prelu"`` or ``"identity"`` for a positive-homogeneous activation node, else None."""
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, HOMOGENEOUS_MODULES):
            return {nn.ReLU: "relu", nn.PReLU: "prelu", nn.Identity: "identity"}[type(m)]
    elif (
        node.op == "call_function"
        and node.target in HOMOGENEOUS_FUNCTIONS
        or node.op == "call_method"
        and node.target == "relu"
    ):
        return "relu"
    return None


def _module_node(node: fx.Node | None, modules: dict[str, nn.Module], types: tuple[type, ...]) -> bool:
    return node is not None and node.op == "call_module" and isinstance(modules[node.target], types)


def find_layer_pairs(model: nn.Module) -> list[LayerPair]:
    """All equalizable pairs of ``model`` in graph order (``torch.fx.symbolic_trace`` must handle the model)."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # data-dependent control flow and the like
        raise TypeError(
            f"cross-layer equalization needs a torch.fx-traceable model; tracing "
            f"{type(model).__name__} failed: {type(e).__name__}: {e}. Make the forward free of "
            "tensor-dependent control flow, or equalize a traceable sub-module."
        ) from e
    modules = dict(gm.named_modules())
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    pairs = []
    for node in gm.graph.nodes:
        if not _module_node(node, modules, LAYERS) or calls[node.target] != 1:
            continue
        cur, bn1, act = node, None, None
        nxt = _only_user(cur)
        if _module_node(nxt, modules, BATCHNORMS):
            bn1, cur = nxt, nxt
            nxt = _only_user(cur)
        if nxt is not None and (kind := _act_kind(nxt, modules)) is not None:
            act, cur = kind, nxt
            nxt = _only_user(cur)
        if not _module_node(nxt, modules, LAYERS) or calls[nxt.target] != 1 or nxt.args[0] is not cur:
            continue
        if any(calls[n.target] != 1 for n in (bn1,) if n is not None):
            continue
        after = _only_user(nxt)
        bn2 = after.target if _module_node(after, modules, BATCHNORMS) else None
        pairs.append(LayerPair(node.target, bn1.target if bn1 is not None else None, act, nxt.target, bn2))
    return pairs
