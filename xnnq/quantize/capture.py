"""Capture: trace the float model with torch.fx and record every node's value on ``dummy_input``."""

from __future__ import annotations

import traceback
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .preserving import stochastic_depth_modules

_SKIP_FRAMES = (str(Path(torch.__file__).parent), str(Path(__file__).resolve().parents[1]))


class CaptureError(RuntimeError):
    """The model could not be traced or run on ``dummy_input``; the message says where and what to do."""


class _Tracer(fx.Tracer):
    """fx tracer that remembers which submodule it is in (for error messages) and honours ``leaf_modules``."""

    def __init__(self, leaf_names: set[str], leaf_types: tuple[type, ...]):
        super().__init__()
        self.leaf_names, self.leaf_types = leaf_names, leaf_types
        self.path: list[str] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        if isinstance(m, stochastic_depth_modules()):  # follows train()/eval() only as a module
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self.path.append(self.path_of_module(m))
        out = super().call_module(m, forward, args, kwargs)
        self.path.pop()
        return out

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def iter(self, obj: fx.Proxy):
        """Iterating a ``chunk`` / ``split`` result whose length the call says (``list(x.chunk(2, 1))``, as in
        YOLOv8's C2f block) yields its items; anything else is fx's error."""
        n = _known_length(obj.node)
        if n is None:
            return super().iter(obj)
        return iter([obj[i] for i in range(n)])


class _Proxy(fx.Proxy):
    """A proxy whose ``len()`` is known for ``chunk`` / ``split`` results (``list()`` asks for it first)."""

    def __len__(self) -> int:
        n = _known_length(self.node)
        return n if n is not None else super().__len__()


def _known_length(node: fx.Node) -> int | None:
    """The number of tensors a ``chunk(n)`` or ``split([sizes])`` node returns, from its arguments (a chunk
    of a dimension shorter than ``n`` returns fewer: then running the graph on the dummy input fails)."""
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", None)
    if node.op not in ("call_method", "call_function") or name not in ("chunk", "split"):
        return None
    arg = (
        node.args[1]
        if len(node.args) > 1
        else node.kwargs.get("chunks", node.kwargs.get("split_size_or_sections"))
    )
    if name == "chunk" and isinstance(arg, int):
        return arg
    if name == "split" and isinstance(arg, (list, tuple)) and all(isinstance(a, int) for a in arg):
        return len(arg)
    return None


def _user_frame(exc: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(_SKIP_FRAMES)]
    if not frames:
        return ""
    f = frames[-1]
    return f"{f.filename}:{f.lineno} `{(f.line or '').strip()}`"


def check_dummy_input(dummy_input: Any) -> tuple[torch.Tensor, ...]:
    """``dummy_input`` as a tuple of tensors, or a clear error."""
    args = tuple(dummy_input) if isinstance(dummy_input, (tuple, list)) else (dummy_input,)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise TypeError(
            f"dummy_input must be a tensor (or a tuple of tensors) shaped like one real input batch, "
            f"got {type(dummy_input).__name__}. Example: torch.randn(1, 3, 32, 32)."
        )
    for a in args:
        if not a.is_floating_point():
            raise TypeError(
                f"dummy_input has dtype {a.dtype}; pass a float tensor shaped like a normalized input batch."
            )
    return args


def leaf_names_types(leaf_modules: Iterable[str | type]) -> tuple[set[str], tuple[type, ...]]:
    """``leaf_modules`` split into module names and module types."""
    leaf_modules = tuple(leaf_modules)
    return {m for m in leaf_modules if isinstance(m, str)}, tuple(
        m for m in leaf_modules if isinstance(m, type)
    )


def trace(model: nn.Module, leaf_modules: Iterable[str | type] = ()) -> fx.GraphModule:
    """Symbolically trace ``model``; an untraceable model gives a :class:`CaptureError` naming the module and line."""
    names, types = leaf_names_types(leaf_modules)
    known = dict(model.named_modules())
    missing = sorted(n for n in names if n not in known)
    if missing:
        raise ValueError(f"leaf_modules names {missing} that are not submodules of the model.")
    tracer = _Tracer(names, types)
    try:
        graph = tracer.trace(model)
    except Exception as e:  # fx raises TraceError, TypeError, RuntimeError... on dynamic code
        where = tracer.path[-1] if tracer.path else ""
        mod = (
            f"module `{where}` ({type(known[where]).__name__})"
            if where in known
            else "the model's top-level forward"
        )
        line = _user_frame(e)
        raise CaptureError(
            f"xnnq could not trace {mod}{' at ' + line if line else ''}: {type(e).__name__}: {e}\n"
            f"torch.fx cannot follow data-dependent control flow or Python on tensor values. Fix: pass "
            f"leaf_modules=[{where!r}] to keep that submodule opaque (it then runs in float, unquantized inside), "
            f"or rewrite the code without branching on tensor values."
        ) from e
    _check_mode_independent(model, graph, names, types)
    return fx.GraphModule(model, graph, model.__class__.__name__)


def _check_mode_independent(
    model: nn.Module, graph: fx.Graph, names: set[str], types: tuple[type, ...]
) -> None:
    """Warn when the model traces to another graph in the other mode: a forward that reads ``self.training``
    has that value frozen into the graph (e.g. a train-only branch that would then also run in eval and
    export). Names the first module whose ops differ and the fix."""
    mode = model.training
    model.train(not mode)
    try:
        other = _Tracer(names, types).trace(model)
    except Exception:  # noqa: BLE001 - the other mode does not trace: nothing to compare
        return
    finally:
        model.train(mode)

    def by_module(g: fx.Graph) -> dict[str, list[tuple[str, str]]]:
        ops: dict[str, list[tuple[str, str]]] = {}
        for n in g.nodes:
            stack = n.meta.get("nn_module_stack") or {}
            path = next(reversed(stack.values()))[0] if stack else ""
            ops.setdefault(path, []).append((n.op, str(n.target)))
        return ops

    a, b = by_module(graph), by_module(other)
    if a == b:
        return
    differ = [p for p in (*a, *b) if a.get(p) != b.get(p)]
    where = next((p for p in differ if p), "")
    warnings.warn(
        f"xnnq: the model traces to a different graph in {'eval' if mode else 'train'} mode"
        f"{' in module ' + repr(where) if where else ''}: a forward reads self.training, "
        f"and the graph keeps the {'train' if mode else 'eval'}-mode branch in every mode (also in eval and "
        f"export). Fix: pass leaf_modules=[{where or '<that module>'!r}] so that it runs as a module and "
        "follows train()/eval().",
        RuntimeWarning,
        stacklevel=4,
    )


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        try:
            out = super().run_node(n)
        except Exception as e:
            src = n.meta.get("nn_module_stack", {})
            owner = list(src.keys())[-1] if src else ""
            fix = "dummy_input must have the shape and dtype of one real input batch (e.g. torch.randn(1, 3, H, W))."
            parent = n.args[0] if n.args and isinstance(n.args[0], fx.Node) else None
            if isinstance(e, IndexError) and parent is not None and _known_length(parent) is not None:
                what = parent.target if isinstance(parent.target, str) else parent.target.__name__
                fix = (
                    f"`{what}` returned fewer tensors than its arguments say (torch.chunk does when the "
                    "dimension is shorter than the number of chunks), and the model iterates it: chunk a longer "
                    "dimension, or unpack exactly (`a, b = ...`)."
                )
            raise CaptureError(
                f"running the model on dummy_input failed at graph node `{n.name}` ({n.op} {n.target}"
                f"{', in module ' + repr(owner) if owner else ''}): {type(e).__name__}: {e}\nFix: {fix}"
            ) from e
        self.values[n] = out
        return out


@torch.no_grad()
def record_values(gm: fx.GraphModule, args: tuple[torch.Tensor, ...]) -> dict[fx.Node, Any]:
    """Run ``gm`` once in eval mode (BatchNorm statistics untouched) and keep every node's value."""
    was_training = gm.training
    gm.eval()
    try:
        rec = _Recorder(gm)
        n_in = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
        if n_in != len(args):
            raise CaptureError(
                f"the model's forward takes {n_in} input(s) but dummy_input gives {len(args)}."
            )
        rec.run(*args)
        return rec.values
    finally:
        gm.train(was_training)
