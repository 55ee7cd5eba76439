"""A bit-true integer reference for an exported QDQ model: what TIDL computes, in numpy integers.

``run(onnx_path, x)`` executes an ONNX QDQ file written by ``xnnq.export_onnx(..., format="qdq")``
(QuantizeLinear/DequantizeLinear with power-of-2 scales and zero-point 0, int8/uint8/int16/uint16
activations, int8/int16 weights, int32 biases) with integer arithmetic only:

* ``QuantizeLinear`` of the float network input: ``x / s`` (exact for a power-of-2 ``s``), rounded
  under the rounding mode at the ``input`` site, saturated to the code range.
* every other ``DequantizeLinear → op(s) → QuantizeLinear`` chain: the op runs on the integer codes
  with an exact int64 accumulator (Conv incl. grouped/depthwise, ConvTranspose, Gemm/MatMul, Add/Sub/Mul, Concat,
  pools, Resize, Clip/Relu, shape ops); operands on different grids are brought to the finer one by
  left shifts (as TIDL multiplies each Add/Concat input by an integer factor before one shift); the
  ``QuantizeLinear`` shifts the accumulator right to its grid with the rounding mode at the
  ``requant`` site and saturates (TIDL's ``TIDL_roundSat``).
* graph outputs are dequantized at the end (``ArgMax`` outputs stay int64 indices).
* a linear ``Resize`` is computed exactly and rounded by the ``QuantizeLinear`` after it with the
  rounding mode at the ``resize`` site (TIDL: floor).

``rounding`` (:mod:`xnnq.layers.rounding`): ``"tidl"`` (default: half-up requantization, half-away
input conversion, floored integer bilinear resize), or one mode everywhere: ``"half_even"`` (what
onnxruntime computes for the same file), ``"half_up"``, ``"half_away"``, ``"floor"``.

``dump_dir`` writes one trace per quantized tensor in the layout of TIDL's layer traces
(:mod:`xnnq.export.traces`). Sources for every TIDL fact: docs/README_tidl.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..layers.rounding import Rounding, Site, as_rounding, round_array
from . import reference_ops as ops
from .onnx_graph import constants_to_initializers
from .reference_ops import IntegerReferenceError, QTensor

_CODE_TYPES = {
    TensorProto.INT8: np.int8,
    TensorProto.UINT8: np.uint8,
    TensorProto.INT16: np.int16,
    TensorProto.UINT16: np.uint16,
    TensorProto.INT32: np.int32,
}


@dataclass
class QuantPoint:
    """One ``QuantizeLinear`` of the graph: where a tensor gets its integer codes."""

    node: str  # QuantizeLinear node name
    codes: str  # its output (the integer codes)
    tensor: str  # the DequantizeLinear output that carries the codes on (the quantized tensor's name)
    scale: float
    dtype: type  # numpy code type


def _pow2_exp(scale: np.ndarray, where: str) -> np.ndarray:
    s = np.asarray(scale, dtype=np.float64)
    mant, e = np.frexp(s)
    if np.any(s <= 0) or np.any(mant != 0.5):
        raise IntegerReferenceError(
            f"{where}: scale {s.ravel()[:4].tolist()} is not a power of 2; the integer reference "
            "executes power-of-2 QDQ exports (export with power2=True)"
        )
    return (e - 1).astype(np.int64)


def _zero_point_ok(arr: np.ndarray | None, where: str) -> None:
    if arr is not None and np.any(arr != 0):
        raise IntegerReferenceError(
            f"{where}: zero-point {np.ravel(arr)[:4].tolist()} is not 0; TIDL's symmetric QDQ "
            "models (and the integer reference) need zero-point 0"
        )


class IntegerReference:
    """A QDQ ONNX model prepared for integer execution; call it on one batch of float inputs."""

    def __init__(self, model: str | Path | onnx.ModelProto, rounding: Rounding | str = Rounding.TIDL):
        self.rounding = as_rounding(rounding)
        if not isinstance(model, onnx.ModelProto):
            model = onnx.load(str(model))
        model = onnx.ModelProto.FromString(model.SerializeToString())
        constants_to_initializers(model)
        self.model = model
        g = model.graph
        self.inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        self.inputs = [i.name for i in g.input if i.name not in self.inits]
        self.outputs = [o.name for o in g.output]
        dims = g.input[0].type.tensor_type.shape.dim if g.input else []
        self.static_batch = dims[0].dim_value if dims and dims[0].HasField("dim_value") else None
        self.batch: int | None = None  # the batch size of the pass being run (trace)
        self.consts: dict[str, object] = dict(self.inits)
        self.points: list[QuantPoint] = []
        users: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for i in n.input:
                users.setdefault(i, []).append(n)
        for n in g.node:
            where = f"node {n.name or n.output[0]!r} ({n.op_type})"
            if n.op_type == "DequantizeLinear" and n.input[0] in self.inits:
                self.consts[n.output[0]] = self._const_dq(n, where)
            elif n.op_type == "QuantizeLinear":
                scale, dtype = self._q_params(n, where)
                dq = [u for u in users.get(n.output[0], []) if u.op_type == "DequantizeLinear"]
                tensor = dq[0].output[0] if dq else n.output[0]
                self.points.append(QuantPoint(n.name or n.output[0], n.output[0], tensor, scale, dtype))
        self.nodes = [n for n in g.node if n.output[0] not in self.consts]
        self._point_of = {p.codes: p for p in self.points}

    # ------------------------------------------------------------------------------- constants
    def _attr(self, node: onnx.NodeProto) -> dict:
        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def _q_params(self, node: onnx.NodeProto, where: str) -> tuple[float, type]:
        if len(node.input) < 2 or node.input[1] not in self.inits:
            raise IntegerReferenceError(f"{where}: the scale must be a constant")
        scale = self.inits[node.input[1]]
        if np.size(scale) != 1:
            raise IntegerReferenceError(f"{where}: per-axis activation quantization is not supported")
        zp = self.inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        _zero_point_ok(zp, where)
        attrs = self._attr(node)
        dtype = np.uint8 if zp is None else zp.dtype.type
        if attrs.get("output_dtype"):
            dtype = _CODE_TYPES[attrs["output_dtype"]]
        if dtype not in (np.int8, np.uint8, np.int16, np.uint16):
            raise IntegerReferenceError(
                f"{where}: code type {np.dtype(dtype).name} is not supported (int8/uint8/int16/uint16)"
            )
        _pow2_exp(scale, where)
        return float(scale), dtype

    def _const_dq(self, node: onnx.NodeProto, where: str) -> QTensor:
        codes = self.inits[node.input[0]]
        scale = self.inits.get(node.input[1])
        if scale is None:
            raise IntegerReferenceError(f"{where}: the scale must be a constant")
        zp = self.inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        _zero_point_ok(zp, where)
        if not np.issubdtype(codes.dtype, np.integer):
            raise IntegerReferenceError(f"{where}: dequantizes a float constant")
        exp = _pow2_exp(scale, where)
        if exp.ndim == 1 and exp.size > 1:
            axis = self._attr(node).get("axis", 1) % codes.ndim
            shape = [1] * codes.ndim
            shape[axis] = -1
            exp = exp.reshape(shape)
        else:
            exp = int(exp.reshape(-1)[0])
        return QTensor(codes.astype(np.int64), exp, 1)

    # -------------------------------------------------------------------------------- execution
    def __call__(self, *inputs: np.ndarray) -> list[np.ndarray]:
        return self.trace(*inputs)[0]

    def trace(
        self, *inputs: np.ndarray, keep: bool = False
    ) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
        """Outputs of one batch and (``keep``) the codes of each QuantizeLinear, by its output name."""
        if len(inputs) != len(self.inputs):
            raise ValueError(
                f"reference: the model takes {len(self.inputs)} input(s) {self.inputs}, got {len(inputs)}"
            )
        env: dict[str, object] = dict(self.consts)
        self.batch = int(np.shape(inputs[0])[0]) if inputs and np.ndim(inputs[0]) else None
        for name, x in zip(self.inputs, inputs):
            env[name] = np.asarray(x)
        codes: dict[str, np.ndarray] = {}
        for node in self.nodes:
            where = f"node {node.name or node.output[0]!r} ({node.op_type})"
            ins = [env[i] if i else None for i in node.input]
            try:
                outs = self._run_node(node, ins, where)
            except IntegerReferenceError:
                raise
            except (ValueError, IndexError, KeyError) as e:
                raise IntegerReferenceError(f"{where}: {e}") from e
            except AttributeError as e:  # a float array where the op reads a quantized tensor's fields
                raise IntegerReferenceError(
                    f"{where}: an input is a float tensor (a constant or a layer xnnq did not quantize) where "
                    f"a quantized one is needed ({e}); the integer reference runs quantized graphs only"
                ) from e
            for name, value in zip(node.output, outs):
                env[name] = value
            if keep and node.op_type == "QuantizeLinear":
                p = self._point_of[node.output[0]]
                codes[node.output[0]] = env[node.output[0]].num.astype(p.dtype)
        results = []
        for name in self.outputs:
            v = env[name]
            results.append(v.value().astype(np.float32) if isinstance(v, QTensor) else np.asarray(v))
        return results, codes

    def _run_node(self, node: onnx.NodeProto, ins: list, where: str) -> list:
        op = node.op_type
        attrs = self._attr(node)
        if op == "QuantizeLinear":
            p = self._point_of[node.output[0]]
            info = np.iinfo(p.dtype)
            e = int(_pow2_exp(p.scale, where))
            x = ins[0]
            if isinstance(x, QTensor):
                site = x.site or Site.REQUANT
                return [QTensor(ops.requantize(x, e, info.min, info.max, self.rounding, site, where), e)]
            v = np.asarray(x, dtype=np.float64) / p.scale  # exact: a power-of-2 scale
            q = round_array(v, self.rounding, Site.INPUT)
            return [QTensor(np.clip(q, info.min, info.max).astype(np.int64), e)]
        if op == "DequantizeLinear":
            _zero_point_ok(ins[2] if len(ins) > 2 else None, where)
            e = int(_pow2_exp(ins[1], where).reshape(-1)[0]) if np.size(ins[1]) == 1 else None
            if e is None:
                raise IntegerReferenceError(
                    f"{where}: per-axis dequantization of an activation is not supported"
                )
            x = ins[0]
            num = x.num if isinstance(x, QTensor) else np.asarray(x).astype(np.int64)
            if isinstance(x, QTensor) and (x.den != 1 or np.ndim(x.exp)):
                raise IntegerReferenceError(f"{where}: dequantizes a tensor that is not integer codes")
            return [QTensor(num, e)]
        for i, v in enumerate(ins):
            if (
                op not in _FLOAT_OK
                and isinstance(v, np.ndarray)
                and np.issubdtype(v.dtype, np.floating)
                and node.input[i] not in self.inits
            ):
                raise IntegerReferenceError(
                    f"{where}: input {node.input[i]!r} is a float tensor that no QuantizeLinear "
                    "quantizes; the integer reference runs quantized graphs only"
                )
        handler = _HANDLERS.get(op)
        if handler is None:
            raise IntegerReferenceError(
                f"{where}: no integer implementation of {op}; supported: {sorted(_HANDLERS)} "
                "and QuantizeLinear/DequantizeLinear"
            )
        out = handler(self, ins, attrs, where)
        return out if isinstance(out, list) else [out]

    # ------------------------------------------------------------------------------- shape ops
    def _reshape_target(self, x: np.ndarray, shape: np.ndarray, allowzero: int) -> list[int]:
        target = [int(s) for s in shape]
        if not allowzero:
            target = [x.shape[i] if s == 0 else s for i, s in enumerate(target)]
        # the graph's static batch: the reference runs any batch size. A target whose first dimension is the
        # batch gets the run's; one that folds the batch into its first dimension (the rows of a Gemm) that
        # dimension scaled by the run's batch
        b0, b = self.static_batch, self.batch
        if target and b0 and b and b != b0:
            if target[0] == b0 and (-1 in target or int(np.prod(target)) != x.size):
                target[0] = b
            elif -1 not in target and int(np.prod(target)) * b == x.size * b0 and target[0] * b % b0 == 0:
                target[0] = target[0] * b // b0
        return target


def _shape_op(fn):
    """A handler that rearranges the numerators (values are unchanged); also on a float input that a
    QuantizeLinear quantizes later."""

    def handler(ref: IntegerReference, ins: list, attrs: dict, where: str):
        if not isinstance(ins[0], QTensor):
            return np.ascontiguousarray(fn(ref, np.asarray(ins[0]), ins, attrs))
        t = ops.scalar_exp(ins[0], where)
        return QTensor(np.ascontiguousarray(fn(ref, t.num, ins, attrs)), t.exp, t.den)

    return handler


def _const(ins: list, i: int):
    return ins[i] if len(ins) > i and ins[i] is not None else None


def _slice(ref, x, ins, attrs):
    starts, ends = np.asarray(ins[1]), np.asarray(ins[2])
    axes = _const(ins, 3)
    axes = np.arange(len(starts)) if axes is None else np.asarray(axes)
    steps = _const(ins, 4)
    steps = np.ones(len(starts), dtype=np.int64) if steps is None else np.asarray(steps)
    sl = [slice(None)] * x.ndim
    for s, e, a, st in zip(starts, ends, axes, steps):
        n = x.shape[int(a)]
        s, e = int(np.clip(s, -n - 1, n)), int(np.clip(e, -n - 1, n))
        sl[int(a)] = slice(s, e, int(st))
    return x[tuple(sl)]


def _pad(ref, x, ins, attrs, where="Pad"):
    pads = np.asarray(ins[1]).astype(int)
    axes = _const(ins, 3)
    axes = list(range(x.ndim)) if axes is None else [int(a) % x.ndim for a in axes]
    k = len(axes)
    widths = [(0, 0)] * x.ndim
    for j, a in enumerate(axes):
        widths[a] = (pads[j], pads[k + j])
    if any(b < 0 or e < 0 for b, e in widths):
        raise IntegerReferenceError(f"{where}: negative pads are not supported")
    mode = attrs.get("mode", b"constant")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    if mode != "constant":
        return np.pad(x, widths, mode={"reflect": "reflect", "edge": "edge", "wrap": "wrap"}[mode])
    return np.pad(x, widths)


def _pad_handler(ref: IntegerReference, ins: list, attrs: dict, where: str):
    t = ins[0]
    value = _const(ins, 2)
    k = 0
    if value is not None and float(np.asarray(value).reshape(-1)[0]) != 0.0:
        t, k = ops.represent(t, float(np.asarray(value).reshape(-1)[0]), where)
    t = ops.scalar_exp(t, where)
    num = _pad(ref, t.num - k, ins, attrs, where) + k
    return QTensor(num, t.exp, t.den)


def _squeeze(ref, x, ins, attrs):
    axes = _const(ins, 1)
    axes = attrs.get("axes") if axes is None else axes
    return np.squeeze(x, axis=tuple(int(a) for a in axes)) if axes is not None else np.squeeze(x)


def _unsqueeze(ref, x, ins, attrs):
    axes = _const(ins, 1)
    axes = attrs.get("axes") if axes is None else axes
    out_ndim = x.ndim + len(axes)
    for a in sorted(int(a) % out_ndim for a in axes):
        x = np.expand_dims(x, a)
    return x


def _flatten(ref, x, ins, attrs):
    axis = int(attrs.get("axis", 1)) % max(x.ndim, 1)
    return x.reshape(int(np.prod(x.shape[:axis])), -1)


def _gather(ref, x, ins, attrs):
    return np.take(x, np.asarray(ins[1]).astype(np.int64), axis=int(attrs.get("axis", 0)))


def _split(ref: IntegerReference, ins: list, attrs: dict, where: str):
    t = ops.scalar_exp(ins[0], where)
    axis = int(attrs.get("axis", 0))
    sizes = _const(ins, 1)
    sizes = attrs.get("split") if sizes is None else sizes
    n = t.shape[axis]
    if sizes is None:
        k = int(attrs["num_outputs"])
        step = -(-n // k)
        sizes = [min(step, n - i * step) for i in range(k)]
    bounds = np.cumsum([int(s) for s in sizes])[:-1]
    return [QTensor(np.ascontiguousarray(p), t.exp, t.den) for p in np.split(t.num, bounds, axis=axis)]


def _clip(ref: IntegerReference, ins: list, attrs: dict, where: str):
    lo, hi = _const(ins, 1), _const(ins, 2)
    lo = attrs.get("min") if lo is None else float(np.asarray(lo).reshape(-1)[0])
    hi = attrs.get("max") if hi is None else float(np.asarray(hi).reshape(-1)[0])
    return ops.clip(ins[0], lo, hi, where)


def _resize(ref: IntegerReference, ins: list, attrs: dict, where: str):
    t = ins[0]
    shape = t.shape
    scales, sizes = _const(ins, 2), _const(ins, 3)
    if sizes is not None and np.size(sizes):
        out = [int(s) for s in sizes]
        if ref.static_batch and out[0] == ref.static_batch:
            out[0] = shape[0]
        fr = [Fraction(o, i) for o, i in zip(out, shape)]
    elif scales is not None and np.size(scales):
        fr = [Fraction(float(s)) for s in np.asarray(scales).reshape(-1)]
        out = [int(np.floor(i * float(s))) for i, s in zip(shape, fr)]
    else:
        raise IntegerReferenceError(f"{where}: Resize needs constant scales or sizes")
    if attrs.get("axes") is not None:
        raise IntegerReferenceError(f"{where}: Resize with axes is not supported")
    return ops.resize(t, fr, out, attrs, where)


def _reduce_mean(ref: IntegerReference, ins: list, attrs: dict, where: str):
    axes = _const(ins, 1)
    axes = attrs.get("axes") if axes is None else [int(a) for a in np.asarray(axes).reshape(-1)]
    if not axes and attrs.get("noop_with_empty_axes"):
        return ins[0]
    return ops.reduce_mean(ins[0], list(axes or []), bool(attrs.get("keepdims", 1)))


def _reduce_max(ref: IntegerReference, ins: list, attrs: dict, where: str):
    t = ops.scalar_exp(ins[0], where)
    axes = _const(ins, 1)
    axes = attrs.get("axes") if axes is None else [int(a) for a in np.asarray(axes).reshape(-1)]
    axes = tuple(int(a) for a in axes) if axes else None
    return QTensor(t.num.max(axis=axes, keepdims=bool(attrs.get("keepdims", 1))), t.exp, t.den)


def _global(kind: str):
    def handler(ref: IntegerReference, ins: list, attrs: dict, where: str):
        t = ins[0]
        axes = list(range(2, t.num.ndim))
        if kind == "avg":
            return ops.reduce_mean(t, axes, True)
        t = ops.scalar_exp(t, where)
        return QTensor(t.num.max(axis=tuple(axes), keepdims=True), t.exp, t.den)

    return handler


def _conv(ref: IntegerReference, ins: list, attrs: dict, where: str):
    return ops.conv(ins[0], ins[1], _const(ins, 2), attrs, where)


def _conv_transpose(ref: IntegerReference, ins: list, attrs: dict, where: str):
    return ops.conv_transpose(ins[0], ins[1], _const(ins, 2), attrs, where)


def _gemm(ref: IntegerReference, ins: list, attrs: dict, where: str):
    c = _const(ins, 2)
    if c is not None and not isinstance(c, QTensor):
        raise IntegerReferenceError(f"{where}: the Gemm bias must be a quantized (DequantizeLinear) constant")
    return ops.gemm(ins[0], ins[1], c, attrs, where)


def _argmax(ref: IntegerReference, ins: list, attrs: dict, where: str):
    return ops.argmax(
        ins[0],
        int(attrs.get("axis", 0)),
        bool(attrs.get("keepdims", 1)),
        bool(attrs.get("select_last_index", 0)),
    )


def _relu(ref: IntegerReference, ins: list, attrs: dict, where: str):
    t = ins[0]
    return t.with_num(np.maximum(t.num, 0))


_HANDLERS = {
    "Conv": _conv,
    "ConvTranspose": _conv_transpose,
    "Gemm": _gemm,
    "MatMul": _gemm,
    "Add": lambda r, ins, a, w: ops.add(ins[0], ins[1], w),
    "Sub": lambda r, ins, a, w: ops.add(ins[0], ins[1], w, sign=-1),
    "Mul": lambda r, ins, a, w: ops.mul(ins[0], ins[1], w),
    "Concat": lambda r, ins, a, w: ops.concat(list(ins), int(a["axis"]), w),
    "MaxPool": lambda r, ins, a, w: ops.max_pool(ins[0], a, w),
    "AveragePool": lambda r, ins, a, w: ops.avg_pool(ins[0], a, w),
    "GlobalAveragePool": _global("avg"),
    "GlobalMaxPool": _global("max"),
    "ReduceMean": _reduce_mean,
    "ReduceMax": _reduce_max,
    "Resize": _resize,
    "Relu": _relu,
    "Clip": _clip,
    "ArgMax": _argmax,
    "Identity": _shape_op(lambda r, x, ins, a: x),
    "Dropout": lambda r, ins, a, w: ins[0],
    "Reshape": _shape_op(
        lambda r, x, ins, a: x.reshape(r._reshape_target(x, ins[1], int(a.get("allowzero", 0))))
    ),
    "Flatten": _shape_op(_flatten),
    "Transpose": _shape_op(lambda r, x, ins, a: np.transpose(x, a.get("perm"))),
    "Squeeze": _shape_op(_squeeze),
    "Unsqueeze": _shape_op(_unsqueeze),
    "Slice": _shape_op(_slice),
    "Gather": _shape_op(_gather),
    "Pad": _pad_handler,
    "Split": _split,
}


# value-preserving ops that may also rearrange the float network input before its QuantizeLinear
_FLOAT_OK = {"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Gather", "Identity"}


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return (
        np.asarray(x, dtype=np.float32)
        if not np.issubdtype(np.asarray(x).dtype, np.integer)
        else np.asarray(x)
    )


def run(
    onnx_path: str | Path | onnx.ModelProto,
    x: np.ndarray | Sequence[np.ndarray],
    *,
    rounding: Rounding | str = Rounding.TIDL,
    dump_dir: str | Path | None = None,
    batch_size: int = 64,
) -> list[np.ndarray]:
    """Execute the QDQ model at ``onnx_path`` on ``x`` with integer arithmetic only.

    Args:
        onnx_path: an ONNX QDQ file (or ``ModelProto``) from ``xnnq.export_onnx(..., format="qdq")``.
        x: the input batch (numpy or torch; several inputs as a list/tuple), any batch size.
        rounding: ``"tidl"`` (default), ``"half_even"`` (onnxruntime's), ``"half_up"``, ``"half_away"``,
            ``"floor"`` (:mod:`xnnq.layers.rounding`).
        dump_dir: write a TIDL-style trace of every quantized tensor there (:mod:`xnnq.export.traces`).
        batch_size: images per integer pass (memory: im2col of one pass).

    Returns:
        The graph outputs in order, dequantized to float32 (integer outputs such as ``ArgMax`` as int64).
    """
    ref = IntegerReference(onnx_path, rounding)
    xs = [_as_numpy(a) for a in (x if isinstance(x, (list, tuple)) else [x])]
    n = xs[0].shape[0]
    outs: list[list[np.ndarray]] = []
    codes: dict[str, list[np.ndarray]] = {}
    for i in range(0, n, batch_size):
        o, c = ref.trace(*[a[i : i + batch_size] for a in xs], keep=dump_dir is not None)
        outs.append(o)
        for k, v in c.items():
            codes.setdefault(k, []).append(v)
    results = [np.concatenate(parts) for parts in zip(*outs)]
    if dump_dir is not None:
        from .traces import write_traces

        write_traces(dump_dir, ref.points, {k: np.concatenate(v) for k, v in codes.items()})
    return results
