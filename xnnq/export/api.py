"""``xnnq.export_onnx``: the TIDL-ready float ONNX or an ONNX QDQ model, plus its TIDL options JSON."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import fx

from ..quantize.capture import check_dummy_input
from .allowlist import warn_unsupported
from .argmax import normalize_argmax_axis, with_argmax
from .graph import ClipInfo, LayerInfo, build_export_module
from .onnx_graph import consumers, initializers, op_counts
from .options import tidl_runtime_options, write_options
from .qdq import ActQuant, WeightQuant, to_qdq
from .tidl import DEFAULT_OPSET, clip_order, finalize, name_clips, torch_to_onnx
from .tidl import simplify as onnxsim_simplify

FORMATS = ("tidl", "qdq")


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote and found."""

    path: Path
    options_path: Path
    model: onnx.ModelProto
    module: fx.GraphModule                    # the float export graph (PyTorch), what the "tidl" ONNX computes
    activation_ranges: dict[str, tuple[float, float]]
    unsupported: list[tuple[str, str]] = field(default_factory=list)

    def op_counts(self) -> dict[str, int]:
        return dict(op_counts(self.model))


def _qmodule(qmodel: Any) -> tuple[torch.nn.Module, fx.GraphModule]:
    gm = getattr(qmodel, "module", None)
    if not isinstance(gm, fx.GraphModule) or not hasattr(qmodel, "plan"):
        raise TypeError(f"export_onnx expects an xnnq wrapper (QuantTrainModule, QuantTestModule or "
                        f"QuantCalibrateModule), got {type(qmodel).__name__}. Wrap the float model first: "
                        "qmodel = xnnq.QuantTestModule(model, dummy_input); qmodel.load_state_dict(...).")
    return qmodel, gm


def export_module(qmodel: Any) -> tuple[fx.GraphModule, list[ClipInfo], list[LayerInfo]]:
    """The float export graph of ``qmodel`` in eval mode (the model's own mode is left as it was)."""
    qmodel, gm = _qmodule(qmodel)
    was_training = qmodel.training
    qmodel.eval()
    try:
        return build_export_module(gm)
    finally:
        qmodel.train(was_training)


def _output_names(sample: Any) -> list[str]:
    if isinstance(sample, dict):
        return [str(k) for k in sample]
    if isinstance(sample, (tuple, list)):
        return ["output"] if len(sample) == 1 else [f"output_{i}" for i in range(len(sample))]
    return ["output"]


def _layer_output(model: onnx.ModelProto, weight: str, clip_tensors: set[str]) -> str:
    """The output name TIDL gives the layer of ``weight``: the quantizer Clip right after it, else its own."""
    users = consumers(model.graph)
    node = next(n for n in model.graph.node if len(n.input) > 1 and n.input[1] == weight)
    out = node.output[0]
    nxt = users.get(out, [])
    if len(nxt) == 1 and nxt[0].op_type == "Clip" and nxt[0].output[0] in clip_tensors:
        return nxt[0].output[0]
    return out


def export_onnx(qmodel: Any, dummy_input: Any, path: str | Path, *, format: str = "tidl", opset: int | None = None,
                simplify: bool = True, check: bool = True, exporter: str = "torchscript",
                input_names: list[str] | None = None, output_names: list[str] | None = None,
                argmax: bool = False) -> ExportResult:
    """Export an xnnq model for TIDL.

    Args:
        qmodel: QuantTrainModule / QuantTestModule / QuantCalibrateModule with observed ranges.
        dummy_input: a tensor (or tuple) shaped like one input batch; its shape is fixed in the graph.
        path: the ``.onnx`` file; ``<stem>.tidl.json`` (TIDL options and range table) is written beside it.
        format: ``"tidl"`` — float graph, BN folded, weights/biases on their grid, a ``Clip`` with the
            power-of-2 range after every quantized activation (compile with ``accuracy_level`` 0);
            ``"qdq"`` — QuantizeLinear/DequantizeLinear with power-of-2 scales and zero-point 0, int8/int16
            weights, int32 biases (TIDL's pre-quantized model option).
        opset: ONNX opset (default 18; QDQ with 16-bit tensors is raised to 21).
        simplify: run onnxsim (constant folding, no shape arithmetic left).
        check: ``onnx.checker`` (full) on the result.
        exporter: ``"torchscript"`` (default: fast, and onnxsim leaves the same graph) or ``"dynamo"``.
        argmax: end the graph with ``ArgMax`` over the channel axis (keepdims, int64) of the first output,
            as TI's segmentation models are exported: the device writes a one-channel class-index map.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    args = tuple(a.detach().cpu() for a in check_dummy_input(dummy_input))
    gm, clips, layers = export_module(qmodel)
    gm = gm.cpu()
    with torch.no_grad():
        sample = gm(*args)
    input_names = input_names or (["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))])
    output_names = output_names or _output_names(sample)
    head = with_argmax(gm) if argmax else gm
    model = torch_to_onnx(head, args, opset or DEFAULT_OPSET, exporter, input_names, output_names)
    if argmax:
        normalize_argmax_axis(model)
    tensors = name_clips(model, clip_order(gm), clips)
    if simplify:
        model = onnxsim_simplify(model)
    model = finalize(model, check)

    inits = initializers(model.graph)
    weights = {}
    for layer in layers:
        w = f"{layer.name}.weight"
        if w not in inits:
            raise RuntimeError(f"export: the weight of layer `{layer.name}` is not the initializer {w!r} in the ONNX graph")
        weights[w] = layer
    clip_tensors = set(tensors.values())
    feature_16 = [tensors[c.name] for c in clips if c.bits == 16]
    params_16 = [_layer_output(model, w, clip_tensors) for w, layer in weights.items() if layer.bits == 16]
    tensor_bits = 16 if clips and all(c.bits == 16 for c in clips) else 8
    if tensor_bits == 16:
        feature_16, params_16 = [], []

    if format == "qdq":
        acts = {tensors[c.name]: ActQuant(c.bits, c.power2, c.scale) for c in clips}
        wq = {w: WeightQuant(layer.bits, layer.per_channel, layer.power2, layer.scale.numpy())
              for w, layer in weights.items() if layer.scale is not None}
        model = finalize(to_qdq(model, acts, wq), check)

    bad = warn_unsupported(model, f"export_onnx({Path(path).name})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    ranges = {tensors[c.name]: (c.lo, c.hi) for c in clips}
    content = {
        "format": format,
        "model": path.name,
        "argmax": bool(argmax),
        "runtime_options": tidl_runtime_options(format, tensor_bits, feature_16, params_16),
        "activation_ranges": {t: [lo, hi] for t, (lo, hi) in ranges.items()},
        "activation_scales": {tensors[c.name]: c.scale for c in clips},
        "activation_bits": {tensors[c.name]: c.bits for c in clips},
        "weights": {w: {"bits": l.bits, "per_channel": l.per_channel, "power2": l.power2} for w, l in weights.items()},
        "quantizers": tensors,
    }
    opts = write_options(path, content)
    return ExportResult(path, opts, model, gm, ranges, bad)
