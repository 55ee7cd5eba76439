"""Float ONNX with quantizer ``Clip`` nodes → ONNX QDQ (the one converter behind the QDQ export and the
TIDL emulation).

* every quantized activation: ``Clip`` → ``QuantizeLinear`` → ``DequantizeLinear`` with zero-point 0,
  uint8/uint16 when the clip's min is 0 (after ReLU), int8/int16 otherwise; the scale is the power-of-2
  range over ``2^b`` (unsigned) or ``2^(b-1)`` (signed) — what :class:`~xnnq.layers.PACT2` computes.
  The ``Clip`` itself is dropped when the quantizer's saturation gives the same interval, and kept
  only where it cuts inside the grid (a ReLU6's 6 on a range of 8).
* every Conv/ConvTranspose/Gemm weight: int8/int16 initializer + ``DequantizeLinear`` (per tensor, or per output
  channel), scale from :func:`xnnq.layers.weight_scale` — the rule under which re-quantizing the
  exported weights changes nothing.
* every bias: int32 codes + ``DequantizeLinear`` with scale ``s_in · s_w`` (``s_in`` of the quantizer
  that feeds the layer: the plan's, given by the export; otherwise found through the range-preserving
  ops of :mod:`xnnq.quantize.preserving`), saturated as the layer does
  (:func:`xnnq.layers.fake_quant.quantize_bias`: with 8-bit operands, bias + products stay in int32).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ..layers.fake_quant import accumulator_headroom, activation_scale, bias_limit, quant_bounds, weight_scale
from .onnx_graph import clip_bounds, drop_unused_initializers, find_source, initializers

QDQ_MIN_OPSET = 13  # per-channel DequantizeLinear
QDQ_16BIT_OPSET = 21  # int16/uint16 QuantizeLinear / DequantizeLinear

_INT_TYPES = {
    (8, True): TensorProto.INT8,
    (8, False): TensorProto.UINT8,
    (16, True): TensorProto.INT16,
    (16, False): TensorProto.UINT16,
}
_NP_TYPES = {(8, True): np.int8, (8, False): np.uint8, (16, True): np.int16, (16, False): np.uint16}


@dataclass
class ActQuant:
    """How one ``Clip`` output tensor is quantized."""

    bits: int = 8
    power2: bool = True
    scale: float | None = None  # the quantizer's own scale; None: derived from the Clip bounds


@dataclass
class WeightQuant:
    """How one Conv/ConvTranspose/Gemm weight initializer is quantized."""

    bits: int = 8
    per_channel: bool = False
    power2: bool = True
    scale: np.ndarray | None = None  # the layer's own scale; None: xnnq's rule on the float weight
    input: str | None = (
        None  # the quantized activation feeding the layer (the plan's); None: found in the graph
    )


def act_qparams(lo: float, hi: float, q: ActQuant) -> tuple[float, int, int, bool]:
    """(scale, qmin, qmax, signed) of a quantizer ``Clip(lo, hi)``: signed iff ``lo < 0``."""
    signed = lo < 0
    r = torch.tensor(max(-lo, hi), dtype=torch.float32)
    scale = q.scale if q.scale is not None else float(activation_scale(r, q.bits, signed, q.power2))
    qmin, qmax = quant_bounds(q.bits, signed)
    return scale, qmin, qmax, signed


def quantize_weight_array(w: np.ndarray, q: WeightQuant, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(integer codes, scale) of a float weight with xnnq's rule (``scale`` 0-d or 1-d along ``axis``)."""
    t = torch.from_numpy(np.array(w, dtype=np.float32))
    if q.scale is not None:
        s = torch.as_tensor(np.asarray(q.scale, dtype=np.float32)).reshape(-1 if q.per_channel else ())
    else:
        s = weight_scale(t, q.bits, axis if q.per_channel else None, q.power2)
    shape = [1] * t.dim()
    if q.per_channel:
        shape[axis] = -1
    qmin, qmax = quant_bounds(q.bits, True)
    codes = torch.clamp(torch.round(t / s.reshape(shape)), qmin, qmax)
    return codes.numpy().astype(_NP_TYPES[(q.bits, True)]), s.numpy().astype(np.float32)


def grid_error(w: np.ndarray, codes: np.ndarray, scale: np.ndarray, axis: int) -> float:
    """max |codes · scale − w| with the product in float32, as the layer computes it: 0.0 when ``w`` was
    already on the grid (also for a non-power-of-2 scale, whose products are not exact in float64 terms)."""
    shape = [1] * w.ndim
    if scale.ndim == 1:
        shape[axis] = -1
    deq = codes.astype(np.float32) * scale.astype(np.float32).reshape(shape)
    return float(np.abs(deq.astype(np.float64) - np.asarray(w, dtype=np.float64)).max())


class _Builder:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.inits = initializers(self.graph)
        self.new_inits: list[onnx.TensorProto] = []
        self.names = (
            {o for n in self.graph.node for o in n.output}
            | set(self.inits)
            | {i.name for i in self.graph.input}
        )

    def unique(self, base: str) -> str:
        name, i = base, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    def const(self, base: str, value: np.ndarray) -> str:
        name = self.unique(base)
        self.new_inits.append(numpy_helper.from_array(value, name))
        return name

    def dq(
        self, codes_name: str, scale_name: str, zp_name: str | None, out: str, axis: int | None
    ) -> onnx.NodeProto:
        inputs = [codes_name, scale_name] + ([zp_name] if zp_name else [])
        kw = {"axis": axis} if axis is not None else {}
        return helper.make_node(
            "DequantizeLinear", inputs, [out], name=self.unique(out + "_DequantizeLinear"), **kw
        )


def to_qdq(
    model: onnx.ModelProto, acts: dict[str, ActQuant], weights: dict[str, WeightQuant]
) -> onnx.ModelProto:
    """Return a QDQ copy of the float ``model`` (see the module docstring).

    ``acts``: {Clip output tensor: ActQuant} — the Clips to turn into Q/DQ (others are left as they are).
    ``weights``: {weight initializer name: WeightQuant} — the Conv/Gemm weights to quantize.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    b = _Builder(model)
    graph = b.graph
    act_scale: dict[str, float] = {}
    new_nodes: list[onnx.NodeProto] = []
    sixteen = any(q.bits == 16 for q in acts.values()) or any(q.bits == 16 for q in weights.values())

    # weights and biases first (they need the scales of the activations that feed their layer)
    act_params = {}
    for node in graph.node:
        if node.op_type == "Clip" and node.output[0] in acts:
            lo, hi = clip_bounds(graph, node)
            act_params[node.output[0]] = (lo, hi, act_qparams(lo, hi, acts[node.output[0]]))
            act_scale[node.output[0]] = act_params[node.output[0]][2][0]
    weight_nodes: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        if (
            node.op_type in ("Conv", "ConvTranspose", "Gemm")
            and len(node.input) > 1
            and node.input[1] in weights
        ):
            weight_nodes.setdefault(node.input[1], []).append(node)
    for wname, q in weights.items():
        users = weight_nodes.get(wname)
        if not users or wname not in b.inits:
            raise ValueError(
                f"to_qdq: weight {wname!r} is not the initializer of a Conv/ConvTranspose/Gemm weight input"
            )
        node = users[0]
        axis = 1 if node.op_type == "ConvTranspose" else 0  # the output channels: [in, out, kH, kW] there
        if node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            axis = 0 if trans_b else 1
        w = numpy_helper.to_array(b.inits[wname])
        codes, s = quantize_weight_array(w, q, axis)
        # a power-of-2 grid holds the float32 weights exactly; another one up to float32 rounding of code · scale
        tol = 0.0 if q.power2 else float(np.abs(w).max()) * 2.0**-23
        if q.scale is not None and grid_error(w, codes, s, axis) > tol:
            raise RuntimeError(
                f"to_qdq: weight {wname!r} is not on the grid of its layer's scale (max error "
                f"{grid_error(w, codes, s, axis):.3g}); the export graph and the layer disagree."
            )
        codes_name = b.const(wname + "_quantized", codes)
        scale_name = b.const(wname + "_scale", s)
        zp_name = b.const(wname + "_zero_point", np.zeros(s.shape, dtype=codes.dtype))
        new_nodes.append(b.dq(codes_name, scale_name, zp_name, wname, axis if q.per_channel else None))
        graph.initializer.remove(b.inits[wname])
        for node in users:  # biases: per layer (onnxsim may share one initializer between layers)
            bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
            src = find_source(graph, node.input[0], set(act_scale))
            if (
                q.input is not None
            ):  # the plan's input quantizer; the graph walk, when it finds one, must agree
                if src is not None and src != q.input:
                    raise RuntimeError(
                        f"to_qdq: the input of the layer of {wname!r} is quantized by {q.input!r} "
                        f"(the plan) but the graph leads to {src!r}; please report it with the model."
                    )
                src = q.input if q.input in act_scale else None
            if bias_name is None or bias_name not in b.inits or src is None:
                continue
            bias = numpy_helper.to_array(b.inits[bias_name]).astype(np.float64)
            bscale = (act_scale[src] * s.astype(np.float64)).astype(np.float32)
            _, qmin, qmax, _ = act_params[src][2]
            room = accumulator_headroom(
                torch.from_numpy(codes), q.bits, acts[src].bits, max(-qmin, qmax), axis
            )
            lim = bias_limit(room).double().numpy()
            bcodes = np.clip(np.round(bias / bscale.astype(np.float64)), -lim, lim).astype(np.int32)
            base = f"{wname.removesuffix('.weight')}.bias"
            bc = b.const(base + "_quantized", bcodes)
            bs = b.const(base + "_scale", bscale)
            bz = b.const(base + "_zero_point", np.zeros(bscale.shape, dtype=np.int32))
            out = b.unique(base)
            new_nodes.append(b.dq(bc, bs, bz, out, 0 if bscale.ndim == 1 else None))
            node.input[2] = out

    # activations: Clip -> (Clip ->) QuantizeLinear -> DequantizeLinear, the DQ output keeps the tensor name
    out_nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        out = node.output[0] if node.output else None
        if node.op_type != "Clip" or out not in acts:
            out_nodes.append(node)
            continue
        lo, hi, (scale, qmin, qmax, signed) = act_params[out]
        bits = acts[out].bits
        x = node.input[0]
        if np.float32(lo) > np.float32(qmin * scale) or np.float32(hi) < np.float32(
            qmax * scale
        ):  # cuts inside
            clipped = b.unique(out + "_clipped")
            node.output[0] = clipped
            out_nodes.append(node)
            x = clipped
        s_name = b.const(out + "_scale", np.array(scale, dtype=np.float32))
        z_name = b.const(out + "_zero_point", np.zeros((), dtype=_NP_TYPES[(bits, signed)]))
        qname = b.unique(out + "_quantized")
        out_nodes.append(
            helper.make_node(
                "QuantizeLinear", [x, s_name, z_name], [qname], name=b.unique(out + "_QuantizeLinear")
            )
        )
        out_nodes.append(b.dq(qname, s_name, z_name, out, None))
    del graph.node[:]
    graph.node.extend(new_nodes + out_nodes)
    graph.initializer.extend(b.new_inits)
    drop_unused_initializers(model)
    opset = next(o for o in model.opset_import if o.domain in ("", "ai.onnx"))
    opset.version = max(opset.version, QDQ_16BIT_OPSET if sixteen else QDQ_MIN_OPSET)
    return model
