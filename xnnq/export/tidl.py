"""The float ("tidl") ONNX: the export graph written with torch.onnx, simplified, named and checked.

Steps: ``torch.onnx.export`` of the export graph (static shapes from the dummy input, eval mode) →
each quantizer's ``Clip`` output tensor renamed to the quantizer's name (so the range table, the 16-bit
lists and Netron all speak the model's module paths) → onnxsim (constant folding: no
Shape/Gather/Concat arithmetic is left, e.g. around ``Resize``) → shape inference → ``onnx.checker``.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Sequence

import numpy as np
import onnx
import torch

from .graph import Clip, ClipInfo
from .onnx_graph import (
    clip_bounds,
    constants_to_initializers,
    consumers,
    drop_unused_initializers,
    producers,
    rename_tensor,
)

DEFAULT_OPSET = 18
EXPORTERS = ("torchscript", "dynamo")


@contextlib.contextmanager
def _mha_fastpath(enabled: bool):
    """torch's fused inference kernels of ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` switched
    (``torch.backends.mha``) for the block, restored after: torch.onnx cannot export the fused ones
    (``aten::_native_multi_head_attention``, ``aten::_transformer_encoder_layer_fwd``); the others compute
    the same layers in ops it can."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def torch_to_onnx(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    opset: int,
    exporter: str = "torchscript",
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
) -> onnx.ModelProto:
    """Export ``module`` (eval mode) with static shapes; ``exporter`` is "torchscript" (fast) or "dynamo"."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad(), _mha_fastpath(False):
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            prog = torch.onnx.export(
                module,
                args,
                dynamo=True,
                opset_version=opset,
                input_names=input_names,
                output_names=output_names,
                verbose=False,
            )
            return prog.model_proto
        # keep_initializers_as_inputs: torch would otherwise merge initializers of equal value (a conv shared
        # across call sites, two zero-initialised layers) and a layer's weight would lose its own name
        torch.onnx.export(
            module,
            args,
            buf,
            dynamo=False,
            opset_version=opset,
            input_names=input_names,
            output_names=output_names,
            do_constant_folding=True,
            keep_initializers_as_inputs=True,
        )
    model = onnx.load_from_string(buf.getvalue())
    inits = {t.name for t in model.graph.initializer}
    kept = [i for i in model.graph.input if i.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    return model


def clip_order(gm: torch.fx.GraphModule) -> list[tuple[str, float, float]]:
    """Every :class:`Clip` module call of the export graph in execution order: (name, lo, hi)."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            m = gm.get_submodule(n.target)
            if isinstance(m, Clip):
                out.append((n.target, m.lo, m.hi))
    return out


def name_clips(
    model: onnx.ModelProto, order: list[tuple[str, float, float]], clips: list[ClipInfo]
) -> dict[str, str]:
    """Rename each quantizer's ``Clip`` output to the quantizer's name; returns {quantizer: tensor name}.

    The ONNX ``Clip`` nodes come in the export graph's execution order; each is matched to the next
    expected quantizer with the same bounds (a ``Clip`` of the model's own, e.g. a Hardtanh, is skipped).
    A graph output keeps its name.
    """
    graph = model.graph
    quantized = {c.name for c in clips}
    outputs = {o.name for o in graph.output}
    mapping: dict[str, str] = {}
    i = 0
    for node in list(graph.node):
        if node.op_type != "Clip" or i >= len(order):
            continue
        name, lo, hi = order[i]
        b_lo, b_hi = clip_bounds(graph, node)
        # the ONNX bounds are float32: compare there (a non-power-of-2 bound is not exact in float32)
        if np.float32(b_lo) != np.float32(lo) or np.float32(b_hi) != np.float32(hi):
            continue
        i += 1
        if name not in quantized:
            continue
        out = node.output[0]
        if out not in outputs and out != name:
            rename_tensor(graph, out, name)
            out = name
        node.name = name
        mapping[name] = out
    missing = [c.name for c in clips if c.name not in mapping]
    if missing:
        raise RuntimeError(
            f"export: the ONNX graph has no Clip for the quantizer(s) {missing[:5]}; the exporter "
            "changed the graph in a way xnnq does not follow. Please report it with the model."
        )
    return mapping


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxsim with static shapes; raises if the simplified graph differs from the original."""
    import onnxsim

    # every layer keeps its own weight initializer (a conv shared across call sites is one layer per call)
    out, ok = onnxsim.simplify(model, skipped_optimizers=["eliminate_duplicate_initializer"])
    if not ok:
        raise RuntimeError("onnxsim could not validate the simplified model against the original")
    return out


def fuse_mish(model: onnx.ModelProto) -> int:
    """Turn ``Mul(x, Tanh(Softplus(x)))`` (how torch exports ``nn.Mish`` / ``F.mish``) into the ``Mish`` op of
    opset 18, which TIDL runs as its Mish layer (Softplus is not a TIDL op) [tidl-ops]; in place, when the
    model's opset is at least 18. Returns the number of Mish nodes made."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 18:
        return 0
    graph = model.graph
    prod, users = producers(graph), consumers(graph)
    mish_at: dict[int, onnx.NodeProto] = {}  # id of the Mul -> the Mish that replaces it
    drop: set[int] = set()  # its Tanh and Softplus
    for mul in graph.node:
        if mul.op_type != "Mul" or len(mul.input) != 2:
            continue
        for i in (0, 1):
            tanh = prod.get(mul.input[i])
            soft = prod.get(tanh.input[0]) if tanh is not None and tanh.op_type == "Tanh" else None
            x = mul.input[1 - i]
            if (
                soft is not None
                and soft.op_type == "Softplus"
                and soft.input[0] == x
                and len(users.get(tanh.output[0], [])) == 1
                and len(users.get(soft.output[0], [])) == 1
            ):
                name = (mul.name or mul.output[0]) + "_mish"
                mish_at[id(mul)] = onnx.helper.make_node("Mish", [x], [mul.output[0]], name=name)
                drop.update((id(tanh), id(soft)))
                break
    if mish_at:  # the Mish where its Mul was: after x, before every reader of the product
        nodes = [mish_at.get(id(n), n) for n in graph.node if id(n) not in drop]
        del graph.node[:]
        graph.node.extend(nodes)
    return len(mish_at)


def tidy_and_check(model: onnx.ModelProto, check: bool = True) -> onnx.ModelProto:
    """Constants as initializers, shape inference (strict) and ``onnx.checker``."""
    constants_to_initializers(model)
    drop_unused_initializers(model)
    model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model
