"""TIDL's quantization-parameters file (``advanced_options:quant_params_proto_path``): write and read it.

TIDL imports pre-quantized ONNX QDQ models in 8 bits only; ranges for a mix of 8- and 16-bit layers
go through this prototxt file instead ([tidl-fsg-quant] A.2, [tidl-quant-proto]). The message layout
(``TIDLNetQuantParams`` → ``TidlLayerQuantParams`` → ``TidlTensorQuantParams``) is TI's documented
specification, rebuilt here as a protobuf descriptor, so the file is written and parsed by protobuf's own
text format — not by string formatting.

What TI documents: in read mode (the file exists) TIDL skips calibration and derives its scales from
the ``min``/``max`` of each tensor only; every layer needs min/max for all its tensors (inside
±FLT_MAX); a bias needs ``size`` values; only symmetric quantization; only a network offloaded as one
subgraph. If the file does not exist TIDL *writes* one (its own PTQ) — so the path in the options must
resolve where the compiler runs.

What TI does not document, and how xnnq writes it (each can be changed by the argument named):

* layer names for ONNX models: the output tensor name of each node (the convention TI documents for
  ``deny_list:layer_name`` and the 16-bit lists); every node of the graph is listed, and the input as
  ``TIDL_DataLayer``, so a fused TIDL layer finds its range under either of its ONNX names.
* ``bit_depth``: the .proto default is 8 but TI's example writes 1 for 8-bit layers — ``bit_depth``
  ``"bits"`` (8/16, default) or ``"bytes"`` (1/2). The 16-bit layers are also named in TIDL's
  documented 16-bit option lists, so precision does not hang on this field.
* ``min``/``max`` of an activation: ``±(largest code × step)`` (``0`` below for unsigned), from which both
  a power-of-2 rule (round the magnitude up to 2^k) and a max/largest-code rule give the simulation's
  step back. ``scale``: ``1/step`` (TIDL's multiply-to-integer convention, seen in TI's example where the
  weight scale is 128/max|w|); ``element_type``: eTIDL_ElementType ([tidl-io]: 0 uint8, 1 int8, 2 uint16,
  3 int16, 5 int32) — both informative, TIDL reads min/max.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from ..quantize.preserving import PRESERVING_ONNX_OPS
from .onnx_graph import consumers, gelu_patterns, initializers, producers
from .tidl_ops import DATA_LAYER, TIDL_LAYERS

FLT_MAX = float(np.finfo(np.float32).max)
# ops whose output holds every input value (reshaped, reordered, or with zeros added): a tensor read only
# through them by a quantizer has that quantizer's range (a Gemm whose 3-d output is reshaped back)
_ALL_VALUES_OPS = frozenset(
    {"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Dropout", "Pad"}
)
_ELEMENT_TYPE = {(8, False): 0, (8, True): 1, (16, False): 2, (16, True): 3, (32, True): 5}
BIT_DEPTH_STYLES = ("bits", "bytes")
UNQUANTIZED_MODES = ("natural", "error")
# bounded functions whose output the simulation may leave in float: whether their range is signed
NATURAL_SIGNED = {"Sigmoid": False, "HardSigmoid": False, "Tanh": True}
GELU_LAYER = "TIDL_BatchNormLayer"  # TIDL maps an erf GELU to its Batchnorm layer [tidl-vtfr]


@functools.lru_cache(maxsize=1)
def message_class() -> type:
    """The ``TIDLNetQuantParams`` message class, built from TI's documented .proto (proto2)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="xnnq_tidl_quant_params.proto", syntax="proto2")

    def enum(name: str, values: dict[str, int]) -> None:
        e = fdp.enum_type.add(name=name)
        for k, v in values.items():
            e.value.add(name=k, number=v)

    def message(name: str, fields: list[tuple]) -> None:
        m = fdp.message_type.add(name=name)
        for fname, number, ftype, label, extra in fields:
            f = m.field.add(name=fname, number=number, type=ftype, label=label)
            if "type_name" in extra:
                f.type_name = extra["type_name"]
            if "default" in extra:
                f.default_value = extra["default"]
            if extra.get("packed"):
                f.options.packed = True

    opt, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    enum("TidlQuantType", {"SYMMETRIC": 1, "ASYMMETRIC": 2})
    enum("TidlCalibType", {"PERTENSOR": 1, "PERCHANNEL": 2})
    message(
        "TidlTensorQuantParams",
        [
            ("min", 1, F.TYPE_FLOAT, opt, {"default": "-3.4028234664e+38"}),
            ("max", 2, F.TYPE_FLOAT, opt, {"default": "3.4028234664e+38"}),
            ("size", 3, F.TYPE_UINT32, opt, {}),
            ("element_type", 4, F.TYPE_UINT32, opt, {}),
            ("scale", 5, F.TYPE_DOUBLE, rep, {"packed": True}),
            ("zero_point", 6, F.TYPE_UINT32, rep, {"packed": True}),
            ("value", 7, F.TYPE_DOUBLE, rep, {"packed": True}),
        ],
    )
    tensor = {"type_name": ".TidlTensorQuantParams"}
    message(
        "TidlLayerQuantParams",
        [
            ("layer_name", 1, F.TYPE_STRING, opt, {}),
            ("layer_type", 2, F.TYPE_STRING, opt, {}),
            ("bit_depth", 3, F.TYPE_UINT32, opt, {"default": "8"}),
            ("outputs", 4, F.TYPE_MESSAGE, rep, tensor),
            ("weights", 5, F.TYPE_MESSAGE, rep, tensor),
            ("bias", 6, F.TYPE_MESSAGE, rep, tensor),
            ("slope", 7, F.TYPE_MESSAGE, rep, tensor),
        ],
    )
    message(
        "TIDLNetQuantParams",
        [
            ("num_layers", 1, F.TYPE_INT32, opt, {}),
            ("quant_type", 2, F.TYPE_ENUM, opt, {"type_name": ".TidlQuantType", "default": "SYMMETRIC"}),
            ("calib_type", 3, F.TYPE_ENUM, opt, {"type_name": ".TidlCalibType", "default": "PERTENSOR"}),
            ("layers", 4, F.TYPE_MESSAGE, rep, {"type_name": ".TidlLayerQuantParams"}),
        ],
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("TIDLNetQuantParams"))


# ------------------------------------------------------------------------------------------ data
@dataclass(frozen=True)
class ActRange:
    """The simulation's quantizer of one activation tensor."""

    bits: int
    signed: bool
    scale: float  # step

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def max(self) -> float:
        return self.qmax * self.scale

    @property
    def min(self) -> float:
        return -self.max if self.signed else 0.0


@dataclass
class LayerParams:
    """One ``layers { ... }`` entry."""

    name: str
    layer_type: str
    bits: int
    output: ActRange
    weights: np.ndarray | None = None
    weight_scale: np.ndarray | None = None  # per tensor (1 value) or per output channel
    weight_bits: int = 8
    bias: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def tensor_ranges(
    model: onnx.ModelProto,
    clip_ranges: Mapping[str, ActRange],
    unquantized: str = "natural",
    assumed: list[str] | None = None,
) -> dict[str, ActRange]:
    """The simulation's range of every tensor a node of ``model`` produces (and of the graph inputs).

    ``clip_ranges``: {quantizer Clip output tensor: its quantizer}. A tensor whose only consumer is a
    quantizer Clip (directly or through ops that keep every value, such as the Reshape after a Gemm) takes
    that quantizer (TIDL fuses the Clip into the layer); a range-preserving op (Reshape, Pad, MaxPool, ...)
    passes its input's range on; the inner tensors of an erf GELU (one TIDL layer) take its output's range.
    A Sigmoid / HardSigmoid / Tanh output the simulation leaves in float (the Sigmoid inside an exported
    SiLU, ``x · σ(x)``) is a layer of its own in TIDL: with ``unquantized="natural"`` it gets its function's
    range at its input's bitwidth (``[0, 1 - 2^-b]`` unsigned, ``±(1 - 2^-(b-1))`` signed; its name is
    appended to ``assumed``), with ``"error"`` it is an error. An ArgMax / ArgMin output holds class
    indices: unsigned, step 1, 8 bits (16 beyond 256 classes). Raises naming any tensor left without one.
    """
    if unquantized not in UNQUANTIZED_MODES:
        raise ValueError(
            f"quant_params: 'unquantized' must be one of {UNQUANTIZED_MODES}, got {unquantized!r}"
        )
    graph = model.graph
    prod, users = producers(graph), consumers(graph)
    inits = set(initializers(graph))
    out: dict[str, ActRange] = dict(clip_ranges)
    # an erf GELU is one TIDL layer [tidl-vtfr]: its inner tensors are named with the layer's output range
    gelu_output = {n.output[0]: p.output for p in gelu_patterns(graph) for n in p.nodes[:-1]}

    def quantizer_after(t: str) -> ActRange | None:
        """The range of the quantizer Clip that reads ``t``, alone or through ops that keep every value."""
        for _ in range(64):
            nxt = users.get(t, [])
            if len(nxt) != 1:
                return None
            if nxt[0].op_type == "Clip" and nxt[0].output[0] in clip_ranges:
                return clip_ranges[nxt[0].output[0]]
            if nxt[0].op_type not in _ALL_VALUES_OPS:
                return None
            t = nxt[0].output[0]
        return None

    shapes = {
        v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in (*graph.input, *graph.value_info, *graph.output)
        if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")
    }

    def channels(t: str, node: onnx.NodeProto) -> int:
        """The size of the axis an ArgMax reduces (0 when the shape is not recorded)."""
        shape = shapes.get(t) or []
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        return shape[axis] if shape and -len(shape) <= axis < len(shape) else 0

    def find(t: str, depth: int = 0) -> ActRange | None:
        if t in out:
            return out[t]
        if t in gelu_output and depth < 64:
            return find(gelu_output[t], depth + 1)
        after = quantizer_after(t)
        if after is not None:
            return after
        n = prod.get(t)
        # MaxPool returns input values: without a quantizer of its own (a strided Slice that tidl_fix made a
        # 1x1 MaxPool) it carries its input's range
        if n is not None and (n.op_type in PRESERVING_ONNX_OPS or n.op_type == "MaxPool") and depth < 64:
            return find(n.input[0], depth + 1)
        if n is not None and n.op_type in ("ArgMax", "ArgMin"):  # class indices: integers, step 1
            return ActRange(8 if channels(n.input[0], n) <= 256 else 16, False, 1.0)
        if n is not None and n.op_type in NATURAL_SIGNED and unquantized == "natural" and depth < 64:
            src = find(n.input[0], depth + 1)
            bits, signed = (src.bits if src is not None else 8), NATURAL_SIGNED[n.op_type]
            if assumed is not None and t not in assumed:
                assumed.append(t)
            return ActRange(bits, signed, 2.0 ** -(bits - 1 if signed else bits))
        return None

    tensors = [i.name for i in graph.input if i.name not in inits] + [
        o for n in graph.node for o in n.output if o
    ]
    missing = []
    for t in tensors:
        r = find(t)
        if r is None:
            n = prod.get(t)
            missing.append(f"{t} ({n.op_type if n else 'graph input'})")
        else:
            out[t] = r
    if missing:
        raise ValueError(
            f"quant_params: no simulation range for {len(missing)} tensor(s): {', '.join(missing[:8])}. "
            "Every tensor TIDL computes needs a quantizer (or must follow one through a "
            "range-preserving op). A Sigmoid/Tanh output left in float takes its function's range with "
            "quant_params={'unquantized': 'natural'}; otherwise export this model with format='tidl'."
        )
    return out


def model_layers(
    model: onnx.ModelProto,
    ranges: Mapping[str, ActRange],
    weight_bits: Mapping[str, int],
    weight_scales: Mapping[str, np.ndarray],
    *,
    layer_names: str = "output",
) -> list[LayerParams]:
    """One :class:`LayerParams` per graph input and per node of the float ``model``.

    ``weight_bits`` / ``weight_scales``: by Conv/Gemm weight initializer name. ``layer_names``:
    ``"output"`` (output tensor names, default) or ``"node"`` (node names).
    """
    if layer_names not in ("output", "node"):
        raise ValueError(f"layer_names must be 'output' or 'node', got {layer_names!r}")
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    layers = [
        LayerParams(i.name, DATA_LAYER, ranges[i.name].bits, ranges[i.name])
        for i in graph.input
        if i.name not in inits
    ]
    in_gelu = {id(n) for p in gelu_patterns(graph) for n in p.nodes}
    for n in graph.node:
        out = n.output[0]
        r = ranges[out]
        lp = LayerParams(
            out if layer_names == "output" else (n.name or out),
            GELU_LAYER if id(n) in in_gelu else TIDL_LAYERS.get(n.op_type, n.op_type),
            r.bits,
            r,
        )
        if (
            n.op_type in ("Conv", "Gemm", "ConvTranspose", "MatMul")
            and len(n.input) > 1
            and n.input[1] in inits
        ):
            w = n.input[1]
            lp.weights = numpy_helper.to_array(inits[w]).astype(np.float64)
            lp.weight_bits = int(weight_bits.get(w, 8))
            if w in weight_scales:
                lp.weight_scale = np.atleast_1d(np.asarray(weight_scales[w], dtype=np.float64))
            if len(n.input) > 2 and n.input[2] in inits:
                lp.bias = numpy_helper.to_array(inits[n.input[2]]).astype(np.float64).reshape(-1)
            lp.bits = max(lp.bits, lp.weight_bits)
        layers.append(lp)
    return layers


# ------------------------------------------------------------------------------------ write / read
def _tensor(
    msg,
    lo: float,
    hi: float,
    size: int,
    element_type: int,
    scales: Iterable[float],
    values: Iterable[float] = (),
) -> None:
    msg.min, msg.max = float(lo), float(hi)
    msg.size, msg.element_type = int(size), int(element_type)
    scales = list(scales)
    msg.scale.extend(scales)
    msg.zero_point.extend([0] * len(scales))
    msg.value.extend(float(v) for v in values)


def build_message(layers: list[LayerParams], *, per_channel: bool, bit_depth: str = "bits"):
    """The ``TIDLNetQuantParams`` message for ``layers``."""
    if bit_depth not in BIT_DEPTH_STYLES:
        raise ValueError(f"bit_depth must be one of {BIT_DEPTH_STYLES}, got {bit_depth!r}")
    msg = message_class()()
    msg.num_layers = len(layers)
    msg.quant_type = 1  # SYMMETRIC: the only type the mechanism supports
    msg.calib_type = 2 if per_channel else 1
    for lp in layers:
        lm = msg.layers.add()
        lm.layer_name, lm.layer_type = lp.name, lp.layer_type
        lm.bit_depth = lp.bits if bit_depth == "bits" else lp.bits // 8
        o = lp.output
        _tensor(lm.outputs.add(), o.min, o.max, 1, _ELEMENT_TYPE[(o.bits, o.signed)], [1.0 / o.scale])
        if lp.weights is not None:
            w = lp.weights
            s = (
                lp.weight_scale
                if lp.weight_scale is not None
                else np.array([max(abs(w.min()), abs(w.max())) / ((1 << (lp.weight_bits - 1)) - 1)])
            )
            _tensor(
                lm.weights.add(), w.min(), w.max(), len(s), _ELEMENT_TYPE[(lp.weight_bits, True)], 1.0 / s
            )
        if lp.bias is not None:
            b = lp.bias
            _tensor(lm.bias.add(), b.min(), b.max(), b.size, _ELEMENT_TYPE[(32, True)], [], b)
    return msg


def write_quant_params(
    path: str | Path, layers: list[LayerParams], *, per_channel: bool = False, bit_depth: str = "bits"
) -> Path:
    """Write TIDL's quantization-parameters prototxt for ``layers``; returns the path."""
    from google.protobuf import text_format

    msg = build_message(layers, per_channel=per_channel, bit_depth=bit_depth)
    bad = [
        lm.layer_name
        for lm in msg.layers
        for t in (*lm.outputs, *lm.weights, *lm.bias)
        if not (-FLT_MAX < t.min <= t.max < FLT_MAX)
    ]
    if bad:
        raise ValueError(
            f"quant_params: tensors of layer(s) {bad[:5]} have min/max outside ±FLT_MAX or min > max; "
            "TIDL would not bypass its calibration with such a file"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text_format.MessageToString(msg))
    return path


def read_quant_params(path: str | Path):
    """Parse a quantization-parameters prototxt (TI's documented format) into the message."""
    from google.protobuf import text_format

    return text_format.Parse(Path(path).read_text(), message_class()())


def validate_quant_params(msg) -> list[str]:
    """What TIDL documents a file needs to bypass calibration, checked: reasons it would not (empty: ok)."""
    problems = []
    if msg.num_layers != len(msg.layers):
        problems.append(f"num_layers is {msg.num_layers} but {len(msg.layers)} layers are listed")
    if msg.quant_type != 1:
        problems.append("quant_type must be SYMMETRIC (the only type the mechanism supports)")
    for lm in msg.layers:
        if not lm.outputs:
            problems.append(f"layer {lm.layer_name}: no outputs range")
        for kind in ("outputs", "weights", "bias"):
            for t in getattr(lm, kind):
                if not (-FLT_MAX < t.min <= t.max < FLT_MAX):
                    problems.append(f"layer {lm.layer_name}: {kind} min/max not set within ±FLT_MAX")
        for t in lm.bias:
            if len(t.value) != t.size:
                problems.append(f"layer {lm.layer_name}: bias size {t.size} but {len(t.value)} values")
    return problems
