"""``xnnq.export_onnx``: the TIDL-ready float ONNX or an ONNX QDQ model, plus its TIDL options JSON."""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import fx

from ..quantize.capture import check_dummy_input
from ..quantize.plan import Plan, WeightSpot
from ..targets import KNOWN_OPTIONS, Quantity, Target, compile_options, get_target, refuse
from .argmax import normalize_argmax_axis, with_argmax
from .graph import ClipInfo, LayerInfo, build_export_graph
from .onnx_graph import initializers, op_counts
from .options import tidl_runtime_options, untargeted_scale_type, write_options
from .qdq import ActQuant, WeightQuant, to_qdq
from .quant_params import ActRange, model_layers, tensor_ranges, write_quant_params
from .quant_params import build_message as quant_params_message
from .tidl import DEFAULT_OPSET, clip_order, fuse_mish, name_clips, tidy_and_check, torch_to_onnx
from .tidl import simplify as onnxsim_simplify
from .tidl_check import (
    CHANNEL_PAD_GUARD,
    Violation,
    channel_pad_convs,
    quant_params_violations,
    report,
    tidl_check,
    tidl_fix,
    warn_unsupported,
)

FORMATS = ("tidl", "qdq")


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote and found."""

    path: Path
    options_path: Path
    model: onnx.ModelProto
    module: fx.GraphModule  # the float export graph (PyTorch), what the "tidl" ONNX computes
    activation_ranges: dict[str, tuple[float, float]]
    unsupported: list[tuple[str, str]] = field(default_factory=list)
    target: str | None = None  # the TIDL chip the export was made for (None: no target)
    flow: str | None = None  # "tidl", "qdq" or "quant_params" (mixed 8/16-bit, see docs)
    violations: list[Violation] = field(default_factory=list)  # TIDL importer rules the file breaks
    fixes: list[str] = field(default_factory=list)  # exact fixes applied (tidl_fix)
    quant_params_path: Path | None = None  # TIDL quantization-parameters file (flow "quant_params")
    reference_model: onnx.ModelProto | None = None  # QDQ graph onnxruntime runs (int16 where 16-bit)

    def op_counts(self) -> dict[str, int]:
        return dict(op_counts(self.model))


def _qmodule(qmodel: Any) -> tuple[torch.nn.Module, fx.GraphModule]:
    gm = getattr(qmodel, "module", None)
    if not isinstance(gm, fx.GraphModule) or not hasattr(qmodel, "plan"):
        raise TypeError(
            f"export_onnx expects an xnnq wrapper (QuantTrainModule, QuantTestModule or "
            f"QuantCalibrateModule), got {type(qmodel).__name__}. Wrap the float model first: "
            "qmodel = xnnq.QuantTestModule(model, dummy_input); qmodel.load_state_dict(...)."
        )
    return qmodel, gm


def export_graph(qmodel: Any) -> tuple[fx.GraphModule, list[ClipInfo], list[LayerInfo]]:
    """The float export graph of ``qmodel`` in eval mode (the model's own mode is left as it was), with
    its quantized activations and weight layers; :func:`export_onnx` writes it."""
    qmodel, gm = _qmodule(qmodel)
    was_training = qmodel.training
    qmodel.eval()
    try:
        return build_export_graph(gm, qmodel.plan)
    finally:
        qmodel.train(was_training)


def export_module(qmodel: Any) -> tuple[fx.GraphModule, list[ClipInfo], list[LayerInfo]]:
    """Deprecated name of :func:`export_graph`."""
    warnings.warn(
        "xnnq.export.export_module is deprecated; use export_graph", DeprecationWarning, stacklevel=2
    )
    return export_graph(qmodel)


def _output_names(sample: Any) -> list[str]:
    if isinstance(sample, dict):
        return [str(k) for k in sample]
    if isinstance(sample, (tuple, list)):
        return ["output"] if len(sample) == 1 else [f"output_{i}" for i in range(len(sample))]
    return ["output"]


def _layer_output(model: onnx.ModelProto, spot: WeightSpot, tensors: dict[str, str]) -> str:
    """The output name TIDL gives weight layer ``spot``: its output quantizer's tensor, else its own output."""
    if spot.output_quant in tensors:
        return tensors[spot.output_quant]
    weight = f"{spot.name}.weight"
    return next(n for n in model.graph.node if len(n.input) > 1 and n.input[1] == weight).output[0]


@contextlib.contextmanager
def _adaptive_pools_checked(gm: torch.nn.Module, where: str):
    """Within the block, each adaptive 2-d pool of ``gm`` raises a ``ValueError`` naming it when its output size
    does not divide its input size: ONNX has no such pooling (torch.onnx refuses it)."""

    def check(mod: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        size_in, size_out = tuple(args[0].shape[-2:]), tuple(out.shape[-2:])
        if any(o == 0 or i % o for i, o in zip(size_in, size_out)):
            raise ValueError(
                f"{where}: `{names[mod]}` ({type(mod).__name__}) pools a {size_in[0]}x{size_in[1]} input to "
                f"{size_out[0]}x{size_out[1]}; ONNX (and TIDL) pool only to sizes that divide the input size. "
                "Export with the input size the model is deployed at (e.g. 224x224 for torchvision's "
                "classifiers), or give the model a pooling whose output divides its input."
            )

    pools = (torch.nn.AdaptiveAvgPool2d, torch.nn.AdaptiveMaxPool2d)
    names = {m: n for n, m in gm.named_modules() if isinstance(m, pools)}
    handles = [m.register_forward_hook(check) for m in names]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def export_onnx(
    qmodel: Any,
    dummy_input: Any,
    path: str | Path,
    *,
    format: str | None = None,
    target: str | Target | None = None,
    strict: bool = False,
    tidl_options: dict[str, Any] | None = None,
    quant_params: dict[str, str] | None = None,
    opset: int | None = None,
    simplify: bool = True,
    check: bool = True,
    exporter: str = "torchscript",
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    argmax: bool = False,
) -> ExportResult:
    """Export an xnnq model for TIDL.

    Args:
        qmodel: QuantTrainModule / QuantTestModule / QuantCalibrateModule with observed ranges.
        dummy_input: a tensor (or tuple) shaped like one input batch; its shape is fixed in the graph.
        path: the ``.onnx`` file; ``<stem>.tidl.json`` (TIDL options and range table) is written beside it.
        format: ``"tidl"`` — float graph, BN folded, weights/biases on their grid, a ``Clip`` with the
            power-of-2 range after every quantized activation (compile with ``accuracy_level`` 0);
            ``"qdq"`` — QuantizeLinear/DequantizeLinear with power-of-2 scales and zero-point 0, int8/int16
            weights, int32 biases (TIDL's pre-quantized model option). Default: the target's first
            documented format (TDA4VM: "tidl", the others: "qdq"), "tidl" without a target.
        target: the TIDL chip (``"TDA4VM"``/``"J721E"``, ``"AM68A"``/``"TDA4VL"``, ``"AM69A"``/``"TDA4VH"``,
            ``"AM62A"``, ``"AM67A"``/``"J722S"``; default: the wrapper's ``target``, else none). With a target
            the default format is the chip's, numerics it cannot run are refused (:class:`~xnnq.targets.
            TargetError`), exact fixes are applied (``xnnq.export.tidl_check.tidl_fix``), the compile options
            follow the chip, TIDL's importer rules are checked, and 16-bit layers in ``format="qdq"`` go
            through TIDL's quantization-parameters file (``<stem>.quant_params.prototxt``) with the float
            graph, since TIDL's pre-quantized QDQ import is 8-bit only. Without a target: today's behaviour
            (TDA4VM-like options, only the unsupported-op warning).
        strict: raise :class:`~xnnq.export.tidl_check.TIDLImportError` on importer-rule errors (default: warn).
        tidl_options: further compile options for the JSON (names from ``xnnq.targets.KNOWN_OPTIONS``).
        quant_params: ``{"bit_depth": "bits"|"bytes", "layer_names": "output"|"node", "unquantized":
            "natural"|"error"}`` for the quantization-parameters file (see :mod:`xnnq.export.quant_params`).
        opset: ONNX opset (default 18; QDQ with 16-bit tensors is raised to 21).
        simplify: run onnxsim (constant folding, no shape arithmetic left).
        check: ``onnx.checker`` (full) on the result.
        exporter: ``"torchscript"`` (default: fast, and onnxsim leaves the same graph) or ``"dynamo"``.
        argmax: end the graph with ``ArgMax`` over the channel axis (keepdims, int64) of the first output,
            as TI's segmentation models are exported: the device writes a one-channel class-index map.
    """
    tname = target if target is not None else getattr(qmodel, "target", None)
    tgt = get_target(tname) if tname is not None else None
    format = format or (tgt.formats[0] if tgt is not None else "tidl")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    where = f"export_onnx({Path(path).name})"
    args = tuple(a.detach().cpu() for a in check_dummy_input(dummy_input))
    plan: Plan = _qmodule(qmodel)[0].plan
    scale = None  # with a target, refuse() and compile_options() decide
    if tgt is None:
        non_power2 = [a.name for a in plan.acts if not a.power2]
        scale = untargeted_scale_type(format, all(w.power2 for w in plan.weights), non_power2)
    gm, clips, layers = export_graph(qmodel)
    if tgt is not None:
        refuse(tgt, format, _quantities(clips, layers), where)
    gm = gm.cpu()
    with torch.no_grad(), _adaptive_pools_checked(gm, where):
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
    fuse_mish(model)
    model = tidy_and_check(model, check)
    fixes: list[str] = []
    # the Clips and weights tidl_fix adds (a channel Pad as an identity 1x1 Conv): {tensor: ClipInfo it copies}
    fix_clips: dict[str, ClipInfo] = {}
    fix_weights: dict[str, ClipInfo] = {}
    if tgt is not None:
        model, fixes = tidl_fix(model, tgt)
        model = tidy_and_check(model, check)
        fix_clips, fix_weights = _fixed_quantizers(model, tensors, clips)

    inits = initializers(model.graph)
    weights = {}
    for layer in layers:
        w = f"{layer.name}.weight"
        if w not in inits:
            raise RuntimeError(
                f"export: the weight of layer `{layer.name}` is not the initializer {w!r} in the ONNX graph"
            )
        weights[w] = layer
    # TIDL's 16-bit lists: views of the plan, in ONNX tensor names (exported quantizers, graph order)
    feature_16 = [t for q, t in tensors.items() if plan.act(q).bits == 16]
    feature_16 += [t for t, c in fix_clips.items() if c.bits == 16]
    params_16 = [_layer_output(model, w, tensors) for w in plan.weights if w.bits == 16]
    tensor_bits = 16 if tensors and all(plan.act(q).bits == 16 for q in tensors) else 8
    if tensor_bits == 16:
        feature_16, params_16 = [], []

    sixteen = any(c.bits == 16 for c in clips) or any(layer.bits == 16 for layer in layers)
    flow = format if tgt is None or format == "tidl" or not sixteen else "quant_params"
    path = Path(path)
    reference = None
    acts = {tensors[c.name]: ActQuant(c.bits, c.power2, c.scale) for c in clips}
    wq = {
        w: WeightQuant(
            layer.bits,
            layer.per_channel,
            layer.power2,
            layer.scale.numpy(),
            tensors.get(layer.input_quant or ""),
        )
        for w, layer in weights.items()
        if layer.scale is not None
    }
    for t, c in fix_clips.items():
        acts[t] = ActQuant(c.bits, c.power2, c.scale)
    for w, c in fix_weights.items():  # 1.0 exactly on a power-of-2 grid: code 2^(b-2) at scale 2^-(b-2)
        wq[w] = WeightQuant(c.bits, False, True, np.float32(2.0 ** -(c.bits - 2)), tensors.get(c.name))
    if fix_weights and not all(layer.power2 for layer in layers):  # TIDL's max/127 rule: max |w| = 1 is exact
        model = _without_guards(model, fix_weights)
    if format == "qdq":
        reference = tidy_and_check(to_qdq(_without_guards(model, fix_weights), acts, wq), check)
        if flow == "qdq":  # the written graph has plain zero rows and the weight scale
            fixes = [_qdq_fix_text(f) for f in fixes]
        if flow == "qdq":
            model = reference

    qp_path, qp_msg = None, None
    if flow == "quant_params":
        qp_path = path.with_name(path.stem + ".quant_params.prototxt")
        qp_layers, qp_per_channel = _quant_params_layers(
            model, tensors, clips, weights, quant_params or {}, fix_clips, wq
        )
        qp_msg = quant_params_message(
            qp_layers, per_channel=qp_per_channel, bit_depth=(quant_params or {}).get("bit_depth", "bits")
        )
    if tgt is None:
        runtime_options = tidl_runtime_options(format, tensor_bits, feature_16, params_16, scale)
        runtime_options.update(_extra_options(tidl_options))
        violations: list[Violation] = []
        bad = warn_unsupported(model, where)
    else:
        runtime_options = compile_options(
            tgt,
            flow,
            tensor_bits=tensor_bits,
            per_channel=any(layer.per_channel for layer in layers),
            all_power2=all(c.power2 for c in clips) and all(layer.power2 for layer in layers),
            feature_16bit=feature_16,
            params_16bit=params_16,
            quant_params_path=qp_path.name if qp_path else None,
            extra=tidl_options,
        )
        in_memory = {
            k: v for k, v in runtime_options.items() if k != "advanced_options:quant_params_proto_path"
        }
        violations = tidl_check(model, tgt, options=in_memory)
        if flow != "qdq" and tgt.bias_bits is not None:  # bias codes are explicit in the QDQ form only
            twin = reference if reference is not None else to_qdq(model, acts, wq)
            violations += [v for v in tidl_check(twin, tgt) if v.rule == "Bias.width"]
        if qp_msg is not None:
            names = {i.name for i in model.graph.input} | {o for n in model.graph.node for o in n.output}
            violations += quant_params_violations(qp_msg, names, qp_path.name)
        bad = [(v.node, v.op) for v in violations if v.rule == "graph.unsupported_op"]
        report(violations, where, strict)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    if qp_msg is not None:
        write_quant_params(
            qp_path,
            qp_layers,
            per_channel=qp_per_channel,
            bit_depth=(quant_params or {}).get("bit_depth", "bits"),
        )
    ranges = {tensors[c.name]: (c.lo, c.hi) for c in clips}
    ranges.update({t: (c.lo, c.hi) for t, c in fix_clips.items()})
    act_scales = {tensors[c.name]: c.scale for c in clips} | {t: c.scale for t, c in fix_clips.items()}
    act_bits = {tensors[c.name]: c.bits for c in clips} | {t: c.bits for t, c in fix_clips.items()}
    weight_specs = {
        w: {"bits": li.bits, "per_channel": li.per_channel, "power2": li.power2} for w, li in weights.items()
    } | {w: {"bits": c.bits, "per_channel": False, "power2": True} for w, c in fix_weights.items()}
    content = {
        "format": format,
        "model": path.name,
        **({"target": tgt.name, "flow": flow} if tgt is not None else {}),
        **({"quant_params": qp_path.name} if qp_path else {}),
        "argmax": bool(argmax),
        "runtime_options": runtime_options,
        "activation_ranges": {t: [lo, hi] for t, (lo, hi) in ranges.items()},
        "activation_scales": act_scales,
        "activation_bits": act_bits,
        "weights": weight_specs,
        "quantizers": tensors,
        **({"fixes": fixes, "violations": [v.to_dict() for v in violations]} if tgt is not None else {}),
    }
    opts = write_options(path, content)
    return ExportResult(
        path,
        opts,
        model,
        gm,
        ranges,
        bad,
        tgt.name if tgt else None,
        flow,
        violations,
        fixes,
        qp_path,
        reference,
    )


def _quantities(clips: list[ClipInfo], layers: list[LayerInfo]) -> list[Quantity]:
    return [Quantity(c.name, "activation", c.bits, c.power2) for c in clips] + [
        Quantity(layer.name, "weight", layer.bits, layer.power2, layer.per_channel)
        for layer in layers
        if layer.scale is not None
    ]


def _extra_options(extra: dict[str, Any] | None) -> dict[str, Any]:
    unknown = sorted(set(extra or {}) - set(KNOWN_OPTIONS))
    if unknown:
        raise ValueError(
            f"unknown TIDL compile option(s) {unknown}; known: {', '.join(sorted(KNOWN_OPTIONS))}"
        )
    return dict(extra or {})


def _fixed_quantizers(
    model: onnx.ModelProto, tensors: dict[str, str], clips: list[ClipInfo]
) -> tuple[dict[str, ClipInfo], dict[str, ClipInfo]]:
    """The range Clips and weights of the identity Convs ``tidl_fix`` put in place of channel Pads, each
    with the quantizer whose range the Conv keeps: ({Clip output: ClipInfo}, {weight: ClipInfo})."""
    by_tensor = {tensors[c.name]: c for c in clips}
    fix_clips, fix_weights = {}, {}
    for conv, clip, src in channel_pad_convs(model):
        if clip is None or src not in by_tensor:
            raise RuntimeError(
                f"export: the Conv {conv.name!r} that replaces a channel Pad does not follow a quantizer "
                f"(found {src!r}); please report it with the model."
            )
        fix_clips[clip.output[0]] = by_tensor[src]
        fix_weights[conv.input[1]] = by_tensor[src]
    return fix_clips, fix_weights


def _qdq_fix_text(fix: str) -> str:
    guard = f" but one {CHANNEL_PAD_GUARD} guard weight"
    if guard not in fix:
        return fix
    return fix.replace(guard, "; weight code 2^(b-2) at scale 2^-(b-2), int32 zero bias")


def _without_guards(model: onnx.ModelProto, fix_weights: dict[str, ClipInfo]) -> onnx.ModelProto:
    """``model`` with the identity Convs of fixed channel Pads as plain identity / zero rows (without the
    guard weight ``tidl_fix`` adds for TIDL's own power-of-2 weight quantization)."""
    if not fix_weights:
        return model
    model = onnx.ModelProto.FromString(model.SerializeToString())
    for t in model.graph.initializer:
        if t.name in fix_weights:
            t.CopyFrom(numpy_helper.from_array(np.maximum(numpy_helper.to_array(t), 0.0), t.name))
    return model


def _quant_params_layers(
    model: onnx.ModelProto,
    tensors: dict[str, str],
    clips: list[ClipInfo],
    weights: dict[str, LayerInfo],
    opts: dict[str, str],
    fix_clips: dict[str, ClipInfo] | None = None,
    fix_weights: dict[str, WeightQuant] | None = None,
):
    """The quantization-parameters layers of the float ``model``: the simulation's ranges and weights
    (``fix_clips`` / ``fix_weights``: those of the Convs ``tidl_fix`` added)."""
    unknown = set(opts) - {"bit_depth", "layer_names", "unquantized"}
    if unknown:
        raise ValueError(
            f"quant_params: unknown keys {sorted(unknown)}; use 'bit_depth', 'layer_names' and 'unquantized'"
        )
    clip_ranges = {tensors[c.name]: ActRange(c.bits, c.signed, c.scale) for c in clips}
    clip_ranges.update({t: ActRange(c.bits, c.signed, c.scale) for t, c in (fix_clips or {}).items()})
    assumed: list[str] = []
    ranges = tensor_ranges(model, clip_ranges, opts.get("unquantized", "natural"), assumed)
    if assumed:
        warnings.warn(
            f"quant_params: {', '.join(assumed[:8])}{' ...' if len(assumed) > 8 else ''} "
            f"({len(assumed)} tensor(s)): the simulation leaves these Sigmoid/Tanh outputs in float (e.g. "
            "inside a SiLU, exported as x·Sigmoid(x)), while TIDL runs each as a layer with a quantized output; "
            "the file gives them their function's range (quant_params={'unquantized': 'natural'}), so TIDL's "
            "results can differ from the simulation's by about one step there. 'error' refuses instead; "
            "silu='sigmoid_mul' quantizes a SiLU's σ(x) in the simulation.",
            stacklevel=3,
        )
    scales = {w: layer.scale.numpy() for w, layer in weights.items() if layer.scale is not None}
    bits = {w: layer.bits for w, layer in weights.items()}
    for w, q in (fix_weights or {}).items():
        if w not in weights and q.scale is not None:
            scales[w], bits[w] = np.asarray(q.scale), q.bits
    layers = model_layers(
        model,
        ranges,
        bits,
        scales,
        layer_names=opts.get("layer_names", "output"),
    )
    return layers, any(layer.per_channel for layer in weights.values())
