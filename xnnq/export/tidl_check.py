"""TIDL's importer rules, checked on an ONNX file before TIDL sees it; mechanical fixes where exact.

``tidl_check(path, target)`` returns one :class:`Violation` per broken rule — the node, the rule (with its
TI source), what was found and the fix — and an empty list when the file is clean. The rules are TI's
documented per-operator constraints ([tidl-ops]: edgeai-tidl-tools docs/operators.md), the chip-specific
ones read from the target table (:mod:`xnnq.targets`), the pre-quantized (QDQ) rules, and the
consistency of the model with its compile options. ``tidl_fix`` applies the fixes that change nothing in
what the graph computes (Resize sizes → scales, a strided Slice → a 1x1 MaxPool (after a step-1 Slice
when it does not start at row and column 0), a whole-plane
AveragePool → GlobalAveragePool, zero channels padded on a quantized unsigned tensor → an identity
1x1 Conv + the input's range Clip, the IR version stamp, shape inference). Severity ``"error"``: TIDL
rejects the node or does not offload it; ``"warning"``: outside what TI documents as validated.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..quantize.preserving import PRESERVING_ONNX_OPS
from ..targets import SOURCES, Target, get_target
from .onnx_graph import consumers, drop_unused_initializers, gelu_patterns, producers
from .tidl_ops import FUSED_ONLY_OPS, TIDL_ONNX_OPS, unsupported_nodes

OPS = SOURCES["tidl-ops"]
OPS_11 = SOURCES["tidl-ops-11.0"]
MAX_OPSET, MAX_IR = 19, 8  # [tidl-ops] 'Version': ONNX 1.14.0, ONNX Runtime 1.15.0 (OPSET-19 IR-8)


@dataclass(frozen=True)
class Violation:
    """One broken TIDL importer rule."""

    node: str  # node name (its output tensor when unnamed); the tensor/input for graph-level rules
    op: str
    rule: str  # rule id, e.g. "Conv.depthwise_kernel"
    message: str  # what is wrong, with the values found
    fix: str
    source: str  # TI document and section
    severity: str = "error"
    fixable: bool = False  # tidl_fix (run by export_onnx) repairs it exactly

    def __str__(self) -> str:
        return (
            f"[{self.severity}] {self.node} ({self.op}): {self.rule}: {self.message}. Fix: {self.fix}"
            f"{' (tidl_fix does this)' if self.fixable else ''}. Source: {self.source}"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TIDLImportError(ValueError):
    """``strict`` export: the model breaks TIDL importer rules (the message lists them)."""


class TIDLRuleWarning(UserWarning):
    """A TIDL importer rule broken by an export (non-strict)."""


# ------------------------------------------------------------------------------------------ context
def _attr(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    for a in node.attribute:
        if a.name == name:
            v = helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else v
    return default


def _name(node: onnx.NodeProto) -> str:
    return node.name or (node.output[0] if node.output else node.op_type)


class _Ctx:
    """The model with inferred shapes, constants and producers, the target and the compile options."""

    def __init__(
        self,
        model: onnx.ModelProto,
        target: Target | None,
        options: Mapping[str, Any] | None,
        base_dir: Path | None,
    ):
        self.original = model
        self.recorded = {v.name for v in (*model.graph.input, *model.graph.output, *model.graph.value_info)}
        try:
            self.model = onnx.shape_inference.infer_shapes(model, data_prop=True)
        except (
            onnx.shape_inference.InferenceError,
            onnx.checker.ValidationError,
        ):  # rules that can run still do
            self.model = model
        self.graph = self.model.graph
        self.target, self.options, self.base_dir = target, dict(options or {}), base_dir
        self.inits = {t.name: t for t in self.graph.initializer}
        self.prod, self.users = producers(self.graph), consumers(self.graph)
        self.shapes: dict[str, list[int | None]] = {}
        for v in (*self.graph.input, *self.graph.output, *self.graph.value_info):
            if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape"):
                self.shapes[v.name] = [
                    d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim
                ]
        for t in self.graph.initializer:
            self.shapes[t.name] = list(t.dims)
        self.qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in self.graph.node)
        self.gelus = gelu_patterns(self.graph)  # each TIDL's one GELU layer [tidl-vtfr]
        self.sixteen = self._sixteen_bit()

    def const(self, name: str) -> np.ndarray | None:
        if not name:
            return None
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        n = self.prod.get(name)
        if n is not None and n.op_type == "Constant":
            return numpy_helper.to_array(n.attribute[0].t)
        return None

    def is_const(self, name: str) -> bool:
        """An initializer, a Constant, or a DequantizeLinear of an initializer (a QDQ weight)."""
        if self.const(name) is not None:
            return True
        n = self.prod.get(name)
        return n is not None and n.op_type == "DequantizeLinear" and self.const(n.input[0]) is not None

    def shape(self, name: str) -> list[int | None] | None:
        return self.shapes.get(name)

    def _sixteen_bit(self) -> set[str]:
        out = set()
        for key in (
            "advanced_options:output_feature_16bit_names_list",
            "advanced_options:params_16bit_names_list",
        ):
            out |= {s for s in str(self.options.get(key, "")).replace(",", " ").split() if s}
        for n in self.graph.node:
            if n.op_type == "DequantizeLinear":
                zp = self.const(n.input[2]) if len(n.input) > 2 else None
                codes = self.const(n.input[0])
                dtype = zp.dtype if zp is not None else (codes.dtype if codes is not None else None)
                if dtype is not None and np.dtype(dtype).itemsize == 2:
                    out.add(n.output[0])
        return out

    def v(
        self,
        node: onnx.NodeProto,
        rule: str,
        message: str,
        fix: str,
        *,
        source: str = OPS,
        severity: str = "error",
        fixable: bool = False,
    ) -> Violation:
        return Violation(_name(node), node.op_type, rule, message, fix, source, severity, fixable)


def _spatial(node: onnx.NodeProto, attr: str, default: int, n: int = 2) -> list[int]:
    v = _attr(node, attr)
    return list(v) if v else [default] * n


def _non_singleton(shape: list[int | None] | None) -> int | None:
    if shape is None or any(d is None for d in shape):
        return None
    return sum(1 for d in shape if d != 1)


# ------------------------------------------------------------------------------------------ rules
Rule = Callable[[_Ctx, onnx.NodeProto], Iterable[Violation]]
RULES: dict[str, list[Rule]] = {}
DIM_LIMIT_4 = {
    "Conv",
    "ConvTranspose",
    "AveragePool",
    "GlobalAveragePool",
    "MaxPool",
    "Gemm",
    "MatMul",
    "Resize",
    "Upsample",
    "ArgMax",
    "ArgMin",
    "ReduceMin",
    "ReduceMax",
    "ScatterND",
    "ScatterElements",
}


def rule(*ops: str) -> Callable[[Rule], Rule]:
    def deco(fn: Rule) -> Rule:
        for op in ops:
            RULES.setdefault(op, []).append(fn)
        return fn

    return deco


@rule(*sorted(TIDL_ONNX_OPS - {"QuantizeLinear", "DequantizeLinear", "Constant"}))
def _dims(c: _Ctx, n: onnx.NodeProto):
    limit = 4 if n.op_type in DIM_LIMIT_4 else 6
    ns = _non_singleton(c.shape(n.input[0])) if n.input else None
    if ns is not None and ns > limit:
        yield c.v(
            n,
            f"{n.op_type}.dims",
            f"input {n.input[0]} has {ns} non-singleton dimensions, TIDL takes at most {limit}",
            "reshape so that at most that many dimensions are larger than 1",
        )


@rule("Conv")
def _conv(c: _Ctx, n: onnx.NodeProto):
    if len(n.input) > 1 and not c.is_const(n.input[1]):
        yield c.v(
            n,
            "Conv.variable_weight",
            "the weight is a variable input; only one variable input is allowed",
            "make the weight a constant initializer",
        )
    w = c.shape(n.input[1]) if len(n.input) > 1 else None
    k = _attr(n, "kernel_shape") or (w[2:] if w else None)
    s = _spatial(n, "strides", 1, len(k) if k else 2)
    if len(set(s)) > 1:
        yield c.v(
            n,
            "Conv.stride_equal",
            f"strides {s} differ; the stride must be the same along both dimensions",
            "use equal strides (e.g. stride the other axis with a following pool)",
        )
    if not k or any(d is None for d in k):
        return
    k = list(k)
    if 2 in s and max(k) > 7:
        yield c.v(
            n,
            "Conv.kernel_gt7_stride2",
            f"kernel {k} with stride 2: kernels larger than 7 with stride 2 are not supported",
            "use a kernel <= 7 or stride 1 followed by a pool",
        )
    if 4 in s and k != [11, 11]:
        yield c.v(
            n,
            "Conv.stride4",
            f"stride 4 with kernel {k}: stride 4 is only supported with an 11x11 kernel",
            "use stride 2 twice or an 11x11 kernel",
        )
    group = int(_attr(n, "group", 1))
    x = c.shape(n.input[0])
    cin = x[1] if x and len(x) > 1 else None
    if group > 1 and cin is not None and group == cin:
        allowed = {((1, 3), 1), ((3, 3), 1), ((3, 3), 2), ((5, 5), 1), ((5, 5), 2), ((7, 7), 1), ((7, 7), 2)}
        if (tuple(k), s[0]) not in allowed:
            yield c.v(
                n,
                "Conv.depthwise_kernel",
                f"depthwise (fully grouped) {k[0]}x{k[-1]} stride {s[0]}; "
                "supported: 1x3s1, 3x3s1, 3x3s2, 5x5s1, 5x5s2, 7x7s1, 7x7s2",
                "use one of the supported kernel/stride pairs (rel 11.0 listed 3x3s1, 3x3s2, 5x5s2, 7x7s1, "
                "7x7s2 only)",
            )
    t = c.target
    if t is not None and "conv_3x3_stride3" in t.conv_limits and k == [3, 3] and s[0] == 3:
        yield c.v(
            n,
            "Conv.3x3_stride3",
            f"kernel 3x3 with stride 3 is not supported on {t.name}",
            "use stride 1 or 2 (then pool)",
        )
    if t is not None and "conv_pad_gt_width" in t.conv_limits and x and len(x) == 4 and x[3] is not None:
        pads = _spatial(n, "pads", 0, 4)
        if max(pads) > x[3]:
            yield c.v(
                n,
                "Conv.pad_gt_width",
                f"padding {pads} is larger than the input width {x[3]}, not supported on {t.name}",
                "pad less than the input width (or pad the input explicitly)",
            )
        if x[3] < max(pads[1], pads[3]):
            yield c.v(
                n,
                "Conv.width_lt_pad",
                f"input width {x[3]} is less than max(pad left, pad right) = "
                f"{max(pads[1], pads[3])}, not supported on {t.name}",
                "use a wider input or less padding",
            )


@rule("ConvTranspose")
def _deconv(c: _Ctx, n: onnx.NodeProto):
    w = c.shape(n.input[1]) if len(n.input) > 1 else None
    k = list(_attr(n, "kernel_shape") or (w[2:] if w else []))
    s = _spatial(n, "strides", 1, len(k) or 2)
    if k and (k not in ([2, 2], [3, 3], [4, 4]) or s != [2, 2]):
        yield c.v(
            n,
            "ConvTranspose.kernel_stride",
            f"kernel {k} stride {s}; only 4x4, 3x3 and 2x2 kernels with 2x2 stride are supported",
            "use a supported kernel, or Resize (more efficient)",
        )
    if int(_attr(n, "group", 1)) != 1:
        yield c.v(n, "ConvTranspose.group", "only group = 1 is supported", "use group 1", source=OPS_11)
    if any(d != 1 for d in _spatial(n, "dilations", 1)):
        yield c.v(n, "ConvTranspose.dilation", "only dilations (1, 1) are supported", "use dilation 1")
    t = c.target
    if t is not None and "deconv_16bit" in t.conv_limits and (set(n.output) | set(n.input)) & c.sixteen:
        yield c.v(
            n,
            "ConvTranspose.16bit",
            f"16-bit ConvTranspose is not supported on {t.name}",
            "keep this layer 8-bit, or use Resize",
        )


@rule("AveragePool", "MaxPool", "GlobalAveragePool")
def _pool(c: _Ctx, n: onnx.NodeProto):
    if any(d != 1 for d in _spatial(n, "dilations", 1)):
        yield c.v(n, "Pool.dilation", "only dilations (1, 1) are supported", "use dilation 1")
    if int(_attr(n, "storage_order", 0)) != 0:
        yield c.v(
            n, "Pool.storage_order", "only storage_order = 0 is supported", "use the default", source=OPS_11
        )
    if len([o for o in n.output if o]) > 1:
        yield c.v(
            n,
            "Pool.outputs",
            "the number of outputs must be 1 (no MaxPool indices)",
            "drop the indices output",
        )
    x = c.shape(n.input[0])
    if n.op_type == "GlobalAveragePool":
        if x and len(x) == 4 and None not in x[2:] and x[2] * x[3] > 1024:
            yield c.v(
                n,
                "Pool.global_plane",
                f"plane {x[2]}x{x[3]} = {x[2] * x[3]} > 1024",
                "apply convert_large_global_avg_pooling_to_matmul of TI's tidl-onnx-model-optimizer",
            )
        return
    k, s = list(_attr(n, "kernel_shape") or []), _spatial(n, "strides", 1)
    if n.op_type == "AveragePool" and x and len(x) == 4 and k == x[2:] and not any(_spatial(n, "pads", 0, 4)):
        yield c.v(
            n,
            "Pool.validated_sizes",
            f"kernel {k} covers the whole {x[2]}x{x[3]} input; pooling is validated "
            "for 1x1, 2x2 and 3x3 kernels",
            "use GlobalAveragePool (same result)",
            severity="warning",
            fixable=True,
        )
        return
    if not (
        len(set(k)) == 1
        and k[0] in (1, 2, 3)
        and len(set(s)) == 1
        and s[0] in (1, 2)
        and (k[0], s[0]) != (2, 1)
    ):
        yield c.v(
            n,
            "Pool.validated_sizes",
            f"kernel {k} stride {s}; validated for 3x3, 2x2 and 1x1 kernels with "
            "stride 1 or 2 (not 2x2 stride 1)",
            "use a validated kernel/stride",
            severity="warning",
        )


@rule("Add", "Mul", "Sub", "Div", "Max", "Min", "Sum")
def _eltwise(c: _Ctx, n: onnx.NodeProto):
    if len(n.input) > 2:
        yield c.v(
            n,
            "Eltwise.inputs",
            f"{len(n.input)} inputs; only 2 inputs are supported",
            "chain binary operations",
        )
    consts = [i for i in n.input if c.is_const(i)]
    variables = [i for i in n.input if not c.is_const(i)]
    if (
        consts
        and variables
        and not any(v in c.recorded for v in variables)
        and n.op_type in ("Add", "Mul", "Sub", "Div")
    ):
        yield c.v(
            n,
            "Eltwise.shape_inference",
            "a constant operand needs the layer's input dimensions in the "
            "model, which has no shape information for " + variables[0],
            "run ONNX shape inference",
            fixable=True,
        )


@rule("Gemm")
def _gemm(c: _Ctx, n: onnx.NodeProto):
    if (
        int(_attr(n, "transA", 0)) != 0
        or float(_attr(n, "alpha", 1.0)) != 1.0
        or float(_attr(n, "beta", 1.0)) != 1.0
    ):
        yield c.v(
            n,
            "Gemm.attrs",
            "only transA = 0, alpha = 1.0 and beta = 1.0 are supported",
            "fold alpha/beta into the weights, transpose A upstream",
        )
    if len(n.input) > 1 and not c.is_const(n.input[1]):
        yield c.v(
            n,
            "Gemm.variable_inputs",
            "more than one variable input",
            "make B a constant initializer (or MatMul)",
        )
    if len(n.input) > 2 and n.input[2]:
        b = c.shape(n.input[2])
        if b is not None and not (len(b) == 1 or (len(b) == 2 and b[0] == 1)):
            yield c.v(
                n,
                "Gemm.bias_shape",
                f"bias of shape {b}; it must be [N] or [1, N]",
                "convert_gemm_to_matmul_and_add of TI's tidl-onnx-model-optimizer",
            )


@rule("Softmax")
def _softmax(c: _Ctx, n: onnx.NodeProto):
    x = c.shape(n.input[0])
    if x is None:
        return
    axis = int(_attr(n, "axis", -1)) % len(x)
    if axis not in (len(x) - 1, len(x) - 2):
        yield c.v(
            n,
            "Softmax.axis",
            f"axis {axis} of a rank-{len(x)} input; only width and height are supported",
            "transpose so that the softmax runs over the last axis",
        )


@rule("Concat")
def _concat(c: _Ctx, n: onnx.NodeProto):
    x = c.shape(n.input[0])
    rank = len(x) if x is not None else None
    axis = int(_attr(n, "axis", 0))
    neg = axis - rank if (rank is not None and axis >= 0) else axis
    if (rank is not None and (neg not in (-3, -2, -1) or neg + rank == 0)) or (rank is None and axis == 0):
        yield c.v(
            n,
            "Concat.axis",
            f"axis {axis} (rank {rank}); only axes -3, -2, -1 (channel, height, width) are "
            "supported, never the batch axis",
            "concatenate along channels, height or width",
        )


@rule("Slice")
def _slice(c: _Ctx, n: onnx.NodeProto):
    if any(not c.is_const(i) for i in n.input[1:] if i):
        yield c.v(
            n,
            "Slice.inputs",
            "starts/ends/axes/steps must be constant initializers",
            "constant-fold them (onnxsim)",
        )
        return
    x = c.shape(n.input[0])
    rank = len(x) if x is not None else 4
    axes = c.const(n.input[3]) if len(n.input) > 3 and n.input[3] else np.arange(len(c.const(n.input[1])))
    steps = c.const(n.input[4]) if len(n.input) > 4 and n.input[4] else np.ones(len(axes), np.int64)
    axes = [int(a) % rank for a in axes]
    if 0 in axes:
        yield c.v(
            n, "Slice.batch", "slicing along the batch axis is not supported", "slice non-batch axes only"
        )
    if x is not None and x[0] not in (1, None):
        yield c.v(
            n,
            "Slice.batch_size",
            f"batch size {x[0]}; only batch size 1 is supported",
            "export with a batch-1 dummy input",
        )
    if any(int(s) != 1 for s in steps):
        yield c.v(
            n,
            "Slice.stride",
            f"steps {[int(s) for s in steps]}: a non-1 stride is supported only inside "
            "the patch-merging pattern",
            "a stride-2 slice of H and W is a 1x1 MaxPool with stride 2",
            fixable=_slice_as_pool(c, n) is not None,
        )


@rule("Resize", "Upsample")
def _resize(c: _Ctx, n: onnx.NodeProto):
    mode = _attr(n, "mode", "nearest")
    if mode not in ("nearest", "linear"):
        yield c.v(
            n,
            "Resize.mode",
            f"mode {mode!r}; only 'nearest' and 'linear' are supported",
            "use nearest or (bi)linear",
        )
    scales = _resize_scales(c, n)
    if scales is None:
        sizes = c.const(n.input[3]) if n.op_type == "Resize" and len(n.input) > 3 and n.input[3] else None
        yield c.v(
            n,
            "Resize.sizes",
            "the output is given by sizes"
            + ("" if sizes is not None else " (not constant)")
            + "; TIDL needs constant scales",
            "give constant scales (F.interpolate with scale_factor)",
            fixable=_sizes_to_scales(c, n) is not None,
        )
    else:
        s = [float(v) for v in scales]
        if len(s) >= 3 and any(v != 1.0 for v in s[:-2]):
            yield c.v(
                n,
                "Resize.axes",
                f"scales {s}; resizing is supported along width and height only",
                "keep batch and channel scales at 1",
            )
        hw = s[-2:]
        if any(v < 1.0 for v in hw):
            yield c.v(
                n,
                "Resize.downscale",
                f"scales {hw} < 1 are not supported",
                "downscale with a pool or a strided conv",
            )
        elif hw[0] != hw[-1]:
            yield c.v(
                n, "Resize.hw_equal", f"width and height scales {hw} differ", "use the same factor on both"
            )
        elif any(v > 0 and not math.log2(v).is_integer() for v in hw):
            yield c.v(n, "Resize.power2", f"scale {hw[0]} is not a power of 2", "use a factor of 2, 4, 8...")
    if int(_attr(n, "antialias", 0)) != 0:
        yield c.v(n, "Resize.antialias", "only antialias = 0 is supported", "disable antialiasing")
    if _attr(n, "keep_aspect_ratio_policy", "stretch") != "stretch":
        yield c.v(
            n, "Resize.aspect", "only keep_aspect_ratio_policy = 'stretch' is supported", "use the default"
        )
    if int(_attr(n, "exclude_outside", 0)) != 0:
        yield c.v(n, "Resize.exclude_outside", "only exclude_outside = 0 is supported", "use the default")
    if n.op_type == "Upsample":
        return
    ctm = _attr(n, "coordinate_transformation_mode", "half_pixel")
    nearest = _attr(n, "nearest_mode", "round_prefer_floor")
    if ctm not in ("half_pixel", "pytorch_half_pixel", "asymmetric"):
        yield c.v(
            n,
            "Resize.coordinate_mode",
            f"coordinate_transformation_mode {ctm!r}; supported: half_pixel, pytorch_half_pixel, asymmetric",
            "use align_corners=False",
        )
    elif mode == "nearest" and ctm in ("half_pixel", "pytorch_half_pixel") and nearest != "round_prefer_ceil":
        yield c.v(
            n,
            "Resize.nearest_mode",
            f"nearest_mode {nearest!r} with {ctm}; only 'round_prefer_ceil' is supported",
            "export nearest resizes with coordinate_transformation_mode 'asymmetric' + 'floor' "
            "(PyTorch's nearest)",
        )
    elif mode == "nearest" and ctm == "asymmetric" and nearest != "floor":
        yield c.v(
            n,
            "Resize.nearest_mode",
            f"nearest_mode {nearest!r} with asymmetric; only 'floor' is supported",
            "use nearest_mode 'floor'",
        )
    elif mode == "linear" and ctm == "asymmetric":
        yield c.v(
            n,
            "Resize.linear_asymmetric",
            "'linear' with 'asymmetric' coordinates is not supported",
            "use half_pixel (align_corners=False)",
        )
    out = c.shape(n.output[0])
    if (
        ctm == "pytorch_half_pixel"
        and out
        and len(out) >= 2
        and any(d is not None and d <= 1 for d in out[-2:])
    ):
        yield c.v(
            n,
            "Resize.pytorch_half_pixel_size",
            f"pytorch_half_pixel with output size {out[-2:]} <= 1",
            "use half_pixel",
        )


@rule("Clip")
def _clip(c: _Ctx, n: onnx.NodeProto):
    lo = c.const(n.input[1]) if len(n.input) > 1 and n.input[1] else _attr(n, "min")
    hi = c.const(n.input[2]) if len(n.input) > 2 and n.input[2] else _attr(n, "max")
    lo = -math.inf if lo is None else float(np.asarray(lo).reshape(-1)[0])
    hi = math.inf if hi is None else float(np.asarray(hi).reshape(-1)[0])
    if not (lo <= 0 < hi):
        yield c.v(
            n,
            "Clip.bounds",
            f"bounds [{lo}, {hi}]; only min <= 0 and max > 0 are supported",
            "clip to a range that contains 0 (add an offset before/after)",
        )


@rule("Pad")
def _pad(c: _Ctx, n: onnx.NodeProto):
    if _attr(n, "mode", "constant") != "constant":
        yield c.v(
            n, "Pad.mode", f"mode {_attr(n, 'mode')!r}; only constant padding is supported", "pad with zeros"
        )
    value = c.const(n.input[2]) if len(n.input) > 2 and n.input[2] else None
    if value is not None and value.size and float(value.reshape(-1)[0]) != 0.0:
        yield c.v(
            n, "Pad.value", f"constant_value {float(value.reshape(-1)[0])}; only 0 is supported", "pad with 0"
        )
    pads = c.const(n.input[1]) if len(n.input) > 1 else None
    if pads is None:
        pads = np.asarray(_attr(n, "pads", []) or [])
    x = c.shape(n.input[0])
    rank = len(x) if x is not None else len(pads) // 2
    axes = c.const(n.input[3]) if len(n.input) > 3 and n.input[3] else np.arange(rank)
    padded = [int(a) % rank for a, lo, hi in zip(axes, pads[: len(axes)], pads[len(axes) :]) if lo or hi]
    bad = [a for a in padded if a < rank - 2]
    if bad:
        src = None if c.qdq or _pad_spec(c, n) is None else _range_source(c, n.input[0])
        fixable = (
            src is not None and c.const(src.input[1]) is not None and float(c.const(src.input[1])) == 0.0
        )
        yield c.v(
            n,
            "Pad.axes",
            f"pads {pads.tolist()} pad axis {bad}; padding is supported on width and height only",
            "zero channels (axis 1) of a quantized unsigned tensor: tidl_fix makes the Pad an identity 1x1 Conv"
            if fixable
            else "pad inside a conv (its pads), or move the extra channels into a 1x1 conv / a Concat",
            fixable=fixable,
        )


@rule("Reshape")
def _reshape(c: _Ctx, n: onnx.NodeProto):
    if not c.is_const(n.input[1]):
        yield c.v(
            n,
            "Reshape.shape",
            "the target shape is a variable; only a constant shape is supported",
            "constant-fold the shape (static input shape + onnxsim)",
        )
    if int(_attr(n, "allowzero", 0)) != 0:
        yield c.v(n, "Reshape.allowzero", "only allowzero = 0 is supported", "use the default")


@rule("ArgMax", "ArgMin")
def _argmax(c: _Ctx, n: onnx.NodeProto):
    x = c.shape(n.input[0])
    axis = int(_attr(n, "axis", 0))
    neg = axis - len(x) if (x is not None and axis >= 0) else axis
    if int(_attr(n, "keepdims", 1)) != 1 or neg != -3 or int(_attr(n, "select_last_index", 0)) != 0:
        yield c.v(
            n,
            f"{n.op_type}.attrs",
            f"axis {axis}, keepdims {_attr(n, 'keepdims', 1)}, select_last_index "
            f"{_attr(n, 'select_last_index', 0)}; only axis -3 (channels), keepdims 1, select_last_index 0",
            "take the arg over channels with keepdims",
        )


@rule("DepthToSpace", "SpaceToDepth")
def _d2s(c: _Ctx, n: onnx.NodeProto):
    x, b = c.shape(n.input[0]), int(_attr(n, "blocksize", 1))
    if x is None:
        return
    if len(x) != 4:
        yield c.v(n, f"{n.op_type}.rank", f"rank-{len(x)} input; it must be 4-D", "reshape to NCHW")
    elif n.op_type == "DepthToSpace" and x[1] is not None and x[1] % (b * b):
        yield c.v(
            n,
            "DepthToSpace.channels",
            f"{x[1]} channels is not a multiple of blocksize^2 = {b * b}",
            "use a channel count divisible by blocksize^2",
        )
    elif n.op_type == "SpaceToDepth" and any(d is not None and d % b for d in x[2:]):
        yield c.v(
            n, "SpaceToDepth.size", f"height/width {x[2:]} not multiples of blocksize {b}", "pad or crop"
        )


@rule("BatchNormalization")
def _bn(c: _Ctx, n: onnx.NodeProto):
    if int(_attr(n, "training_mode", 0)) != 0:
        yield c.v(
            n, "BatchNormalization.training", "training_mode = 1 is not supported", "export in eval mode"
        )


@rule("Cast")
def _cast(c: _Ctx, n: onnx.NodeProto):
    inputs, outputs = {i.name for i in c.graph.input}, {o.name for o in c.graph.output}
    if n.input[0] not in inputs and n.output[0] not in outputs:
        yield c.v(
            n,
            "Cast.position",
            "Cast is supported only at the terminal nodes (inputs/outputs) of the network",
            "remove the Cast or move it to an input/output",
        )


@rule("QuantizeLinear", "DequantizeLinear")
def _qdq(c: _Ctx, n: onnx.NodeProto):
    scale = c.const(n.input[1])
    zp = c.const(n.input[2]) if len(n.input) > 2 and n.input[2] else None
    weight = c.const(n.input[0]) is not None
    # per-channel constant weights (axis 0 of a Conv weight) are documented as supported for Conv and Gemm in
    # [tidl-quant] 'TIDL Layer Quantization Restrictions'; the axis = 1 rule is read as the activations'
    if scale is not None and scale.size > 1 and int(_attr(n, "axis", 1)) != 1 and not weight:
        yield c.v(
            n,
            "QDQ.axis",
            f"per-channel activation quantization along axis {_attr(n, 'axis')}; only the "
            "default axis = 1 is supported",
            "quantize activations per tensor",
        )
    dtype = zp.dtype if zp is not None else None
    if dtype is not None and np.dtype(dtype).itemsize > 1 and np.dtype(dtype) != np.int32:
        yield c.v(
            n,
            "QDQ.8bit",
            f"{np.dtype(dtype).name} quantization; pre-quantized ONNX models are 8-bit only",
            "give 16-bit layers through the quantization-parameters file (export_onnx(format='qdq', target=...) "
            "does this)",
            source=SOURCES["tidl-fsg-quant"],
        )
    t = c.target
    if t is None or scale is None:
        return
    if t.power2_only and not all(
        math.log2(float(s)).is_integer() for s in np.asarray(scale).reshape(-1) if s > 0
    ):
        yield c.v(
            n,
            "QDQ.power2",
            f"scale {np.asarray(scale).reshape(-1)[:4].tolist()} is not a power of 2; "
            f"{t.name} runs power-of-2 scales only",
            "quantize with power-of-2 scales (target='TDA4VM' wrappers do)",
            source=t.source("power2_only"),
        )
    if not t.asymmetric and zp is not None and np.any(zp != 0):
        yield c.v(
            n,
            "QDQ.zero_point",
            f"zero-point {np.asarray(zp).reshape(-1)[:4].tolist()}; {t.name} has no asymmetric quantization",
            "quantize symmetrically (zero-point 0)",
            source=t.source("asymmetric"),
        )
    if not t.per_channel_weights and scale.size > 1:
        yield c.v(
            n,
            "QDQ.per_channel",
            f"{scale.size} per-channel scales; {t.name} quantizes per tensor",
            "quantize weights per tensor",
            source=t.source("per_channel_weights"),
        )


GRAPH_RULES: list[Callable[[_Ctx], Iterable[Violation]]] = []


def graph_rule(fn):
    GRAPH_RULES.append(fn)
    return fn


@graph_rule
def _unsupported(c: _Ctx):
    in_gelu = {id(n) for p in c.gelus for n in p.nodes}
    for n in c.graph.node:
        if id(n) in in_gelu:
            continue
        if n.op_type in FUSED_ONLY_OPS:
            yield c.v(
                n,
                "graph.fused_only",
                f"{n.op_type} is supported only inside a fused pattern (GELU, ...), not alone",
                "remove it (export in eval mode; onnxsim drops Identity/Dropout)",
            )
        elif n.op_type not in TIDL_ONNX_OPS and n.op_type != "Constant":
            yield c.v(
                n,
                "graph.unsupported_op",
                f"{n.op_type} is not accelerated by TIDL: it runs on the Arm core "
                "and splits the network into subgraphs",
                "replace it with supported ops",
            )


@graph_rule
def _qdq_float_outputs(c: _Ctx):
    """In a pre-quantized (QDQ) graph, a layer whose output no QuantizeLinear reads (directly or through
    value-keeping ops) has no scale, and TIDL's calibration is bypassed for such models [tidl-fsg-quant A.2]."""
    if not c.qdq:
        return
    outputs = {o.name for o in c.graph.output}
    in_gelu = {id(n) for p in c.gelus for n in p.nodes[:-1]}  # inside the GELU layer

    def quantized(t: str, depth: int = 0) -> bool:
        """Read only by QuantizeLinear, through ops that keep values or a Relu / Clip (fused into the layer)."""
        users = c.users.get(t, [])
        return bool(users) and all(
            u.op_type == "QuantizeLinear"
            or (
                (u.op_type in PRESERVING_ONNX_OPS or u.op_type in ("Relu", "Clip"))
                and depth < 64
                and quantized(u.output[0], depth + 1)
            )
            for u in users
        )

    for n in c.graph.node:
        if (
            # a MaxPool returns input values (a strided Slice that tidl_fix made a 1x1 MaxPool): on their grid
            n.op_type
            in ("QuantizeLinear", "DequantizeLinear", "Constant", "Shape", "Relu", "Clip", "MaxPool")
            or n.op_type in PRESERVING_ONNX_OPS
            or id(n) in in_gelu
            or not n.output
            or n.output[0] in outputs
            or quantized(n.output[0])
        ):
            continue
        yield c.v(
            n,
            "QDQ.float_output",
            f"its output reaches {sorted({u.op_type for u in c.users.get(n.output[0], [])})} without a "
            "QuantizeLinear: the simulation leaves it in float (e.g. the Sigmoid inside a SiLU, exported as "
            "x·Sigmoid(x)), while TIDL computes every layer in fixed point and, for a pre-quantized model, skips "
            "the calibration that would give it a scale; TI does not document the scale it then uses",
            "for a SiLU, wrap with silu='sigmoid_mul' (σ(x) then gets a quantizer, as TIDL's Sigmoid layer "
            "needs); otherwise replace the function by one xnnq quantizes whole (ReLU, Hardswish, "
            "as TI's 'lite' models do), or export format='tidl' on TDA4VM",
            source=SOURCES["tidl-fsg-quant"],
            severity="warning",
        )


@graph_rule
def _static_shapes(c: _Ctx):
    for v in (*c.original.graph.input, *c.original.graph.output):
        if v.name in c.inits:
            continue
        dims = v.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            continue
        inferred = c.shape(v.name)
        if inferred is not None and None not in inferred:  # shape inference finds it: record it
            yield Violation(
                v.name,
                "graph",
                "graph.static_shapes",
                f"{v.name} has no recorded shape (shape inference gives {inferred})",
                "run ONNX shape inference",
                OPS,
                "warning",
                True,
            )
        else:
            yield Violation(
                v.name,
                "graph",
                "graph.static_shapes",
                f"{v.name} has a dynamic or unknown shape {[d.dim_param or d.dim_value for d in dims]}",
                "export with a fixed dummy_input shape (xnnq does) and run shape inference",
                OPS,
            )


@graph_rule
def _versions(c: _Ctx):
    opset = next((o.version for o in c.original.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and opset > MAX_OPSET:
        yield Violation(
            "<model>",
            "graph",
            "graph.opset",
            f"opset {opset}; TIDL documents ONNX Runtime 1.15 / opset {MAX_OPSET}",
            "export with opset <= 19 (16-bit QDQ needs 21: use the quantization-parameters flow instead)",
            OPS,
            "warning",
        )
    if c.original.ir_version > MAX_IR:
        need = helper.find_min_ir_version_for(list(c.original.opset_import), True)
        yield Violation(
            "<model>",
            "graph",
            "graph.ir_version",
            f"IR version {c.original.ir_version}; TIDL documents IR-{MAX_IR}",
            "stamp the lowest IR version the opset allows"
            + ("" if need <= MAX_IR else f" ({need} for this opset: lower the opset)"),
            OPS,
            "warning",
            need <= MAX_IR,
        )


@graph_rule
def _options(c: _Ctx):
    o, t = c.options, c.target
    if not o:
        return
    pq = int(o.get("advanced_options:prequantized_model", 0))
    if c.qdq and pq != 1:
        yield Violation(
            "<options>",
            "options",
            "options.prequantized_model",
            "the model holds QuantizeLinear/"
            "DequantizeLinear but advanced_options:prequantized_model is not 1",
            "set advanced_options:prequantized_model: 1",
            SOURCES["tidl-compile"],
        )
    if pq == 1 and not c.qdq:
        yield Violation(
            "<options>",
            "options",
            "options.prequantized_model",
            "prequantized_model is 1 but the model has no QuantizeLinear/DequantizeLinear",
            "export format='qdq' or drop the option",
            SOURCES["tidl-compile"],
        )
    st = o.get("advanced_options:quantization_scale_type")
    if t is not None and st is not None:
        if int(st) in (3, 4) and t.free_scale_type is None:
            yield Violation(
                "<options>",
                "options",
                "options.scale_type",
                f"quantization_scale_type {st} is not supported on {t.name}",
                "use 1 (power-of-2)",
                t.source("free_scale_type"),
            )
        if int(st) == 0 and t.power2_only:
            yield Violation(
                "<options>",
                "options",
                "options.scale_type",
                f"quantization_scale_type 0 (non-power-of-2) on {t.name}, which runs power-of-2 scales",
                "use 1",
                t.source("power2_only"),
            )
    if c.qdq and st is not None and int(st) == 1:
        scales = [
            c.const(n.input[1]) for n in c.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
        ]
        bad = [
            s
            for s in scales
            if s is not None and not all(math.log2(float(v)).is_integer() for v in s.reshape(-1) if v > 0)
        ]
        if bad:
            yield Violation(
                "<options>",
                "options",
                "options.scale_type",
                f"quantization_scale_type 1 (power-of-2) but {len(bad)} Q/DQ scales are not powers of 2",
                "use the target's scale type 4",
                SOURCES["benchmark-options"],
            )
    names = {x for n in c.graph.node for x in n.output} | {i.name for i in c.graph.input}
    for key in (
        "advanced_options:output_feature_16bit_names_list",
        "advanced_options:params_16bit_names_list",
    ):
        missing = [s for s in str(o.get(key, "")).replace(",", " ").split() if s and s not in names]
        if missing:
            yield Violation(
                "<options>",
                "options",
                "options.16bit_names",
                f"{key} names {missing[:5]}, not tensors of the graph",
                "name layers by their output tensor",
                SOURCES["tidl-compile"],
            )
    qp = o.get("advanced_options:quant_params_proto_path")
    if qp:
        yield from _quant_params_rules(
            c, Path(qp) if Path(qp).is_absolute() or c.base_dir is None else c.base_dir / qp, names
        )


def _quant_params_rules(c: _Ctx, path: Path, names: set[str]):
    if not path.is_file():
        yield Violation(
            "<options>",
            "options",
            "options.quant_params_file",
            f"{path} does not exist: TIDL would write its own (write mode) and calibrate",
            "write the file beside the model (export_onnx does) and give its path as the compiler sees it",
            SOURCES["tidl-quant-proto"],
        )
        return
    from .quant_params import read_quant_params

    yield from quant_params_violations(read_quant_params(path), names, path.name)


def quant_params_violations(msg, names: set[str], where: str = "the file") -> list[Violation]:
    """What a parsed quantization-parameters message lacks for TIDL to bypass calibration on a graph whose
    tensors are ``names`` (and the per-channel case TI leaves undocumented)."""
    from .quant_params import validate_quant_params

    src = SOURCES["tidl-quant-proto"]
    out = [
        Violation("<options>", "options", "options.quant_params_content", p, "rewrite the file", src)
        for p in validate_quant_params(msg)
    ]
    missing = sorted(names - {lm.layer_name for lm in msg.layers})
    if missing:
        out.append(
            Violation(
                "<options>",
                "options",
                "options.quant_params_content",
                f"{len(missing)} tensors have no range in {where}: {missing[:5]}",
                "list every layer (export_onnx does)",
                src,
            )
        )
    if msg.calib_type == 2:
        out.append(
            Violation(
                "<options>",
                "options",
                "options.quant_params_per_channel",
                "per-channel weights with "
                "the quantization-parameters file: TI documents per-channel only with scale type 4 "
                "(asymmetric), while the file is symmetric only",
                "prefer per-tensor weights for mixed 8/16-bit models",
                src,
                "warning",
            )
        )
    return out


@graph_rule
def _bias_width(c: _Ctx):
    t = c.target
    if t is None or t.bias_bits is None or t.bias_bits >= 32:
        return
    lim = 1 << (t.bias_bits - 1)
    for n in c.graph.node:
        if n.op_type not in ("Conv", "Gemm", "ConvTranspose") or len(n.input) < 3 or not n.input[2]:
            continue
        dq, wdq = c.prod.get(n.input[2]), c.prod.get(n.input[1])
        wcodes = c.const(wdq.input[0]) if wdq is not None and wdq.op_type == "DequantizeLinear" else None
        if wcodes is not None and wcodes.dtype.itemsize > 1:
            continue  # a 16-bit layer: the 16-bit bias clipping is TIDL's 8-bit mode
        codes = c.const(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if codes is not None and codes.size and (codes.min() < -lim or codes.max() >= lim):
            yield c.v(
                n,
                "Bias.width",
                f"bias codes reach {int(np.abs(codes).max())}, beyond {t.bias_bits} bits; "
                f"TIDL on {t.name} clips biases to {t.bias_bits} bits by default (its PTQ adjusts the weight "
                "scale instead); TI does not say what it does with a pre-quantized model's int32 bias",
                "keep biases small (weight decay on biases) or the input scale larger",
                severity="warning",
                source=t.source("bias_bits"),
            )


# ------------------------------------------------------------------------------------------ API
def _load(path_or_model: str | Path | onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, Any], Path | None]:
    if isinstance(path_or_model, onnx.ModelProto):
        return path_or_model, {}, None
    from .options import options_path, read_options

    p = Path(path_or_model)
    model = onnx.load(str(p))
    opts = read_options(p).get("runtime_options", {}) if options_path(p).is_file() else {}
    return model, opts, p.parent


def tidl_check(
    path: str | Path | onnx.ModelProto,
    target: str | Target | None = None,
    *,
    options: Mapping[str, Any] | None = None,
) -> list[Violation]:
    """Every TIDL importer rule ``path`` breaks (empty when clean).

    ``target``: a chip name (``"TDA4VM"``, ``"AM69A"``...) for its chip-specific rules; None checks the
    rules common to all chips. ``options``: the TIDL compile options; by default the ``runtime_options``
    of the ``<stem>.tidl.json`` beside ``path`` (when there is one).
    """
    model, opts, base = _load(path)
    c = _Ctx(
        model, None if target is None else get_target(target), opts if options is None else options, base
    )
    out: list[Violation] = []
    for fn in GRAPH_RULES:
        out.extend(fn(c))
    for n in c.graph.node:
        for fn in RULES.get(n.op_type, ()):
            out.extend(fn(c, n))
    return out


def report(violations: list[Violation], where: str, strict: bool = False) -> None:
    """Raise :class:`TIDLImportError` (``strict`` and any error) or warn once listing the violations."""
    if not violations:
        return
    lines = "\n  ".join(str(v) for v in violations)
    errors = [v for v in violations if v.severity == "error"]
    if strict and errors:
        raise TIDLImportError(f"{where}: {len(errors)} TIDL importer rule(s) broken:\n  {lines}")
    warnings.warn(
        f"{where}: {len(violations)} TIDL importer rule(s) broken ({len(errors)} errors):\n  {lines}",
        TIDLRuleWarning,
        stacklevel=3,
    )


def warn_unsupported(model: onnx.ModelProto, where: str = "") -> list[tuple[str, str]]:
    """Without a target: warn, naming the nodes, when ``model`` holds ops TIDL does not accelerate."""
    bad = unsupported_nodes(model)
    if bad:
        shown = ", ".join(f"{name} ({op})" for name, op in bad[:20])
        more = f" and {len(bad) - 20} more" if len(bad) > 20 else ""
        warnings.warn(
            f"{where or 'export'}: {len(bad)} node(s) use ops TIDL does not accelerate (they will run on "
            f"the Arm core and split the network into subgraphs): {shown}{more}. See "
            "xnnq/export/tidl_ops.py; replace them with supported ops if speed matters.",
            stacklevel=3,
        )
    return bad


# ------------------------------------------------------------------------------------------ fixes
def _resize_scales(c: _Ctx, n: onnx.NodeProto) -> np.ndarray | None:
    if n.op_type == "Upsample":
        s = c.const(n.input[1]) if len(n.input) > 1 else _attr(n, "scales")
        return None if s is None else np.asarray(s)
    s = c.const(n.input[2]) if len(n.input) > 2 and n.input[2] else None
    return s if s is not None and s.size else None


def _sizes_to_scales(c: _Ctx, n: onnx.NodeProto) -> np.ndarray | None:
    """Constant scales giving exactly the constant sizes of a Resize on a static input, else None."""
    sizes = c.const(n.input[3]) if n.op_type == "Resize" and len(n.input) > 3 and n.input[3] else None
    x = c.shape(n.input[0])
    if sizes is None or x is None or None in x or _attr(n, "axes") is not None or len(sizes) != len(x):
        return None
    scales = np.array([s / d for s, d in zip(sizes, x)], dtype=np.float32)
    if any(int(np.floor(d * float(s))) != int(o) for d, s, o in zip(x, scales, sizes)):
        return None
    return scales


def _slice_as_pool(c: _Ctx, n: onnx.NodeProto) -> tuple[int, list[int], list[int]] | None:
    """``(k, [start_h, start_w], [end_h, end_w])`` (ends clamped to the size) when the Slice takes every k-th
    row and column (k = 2) of a 4-D tensor, else None. From row and column 0 to the end it is a 1x1 MaxPool of
    stride k; otherwise (``x[..., 1::2, ::2]``, a YOLOv5 Focus slice) a step-1 Slice then that pool."""
    x = c.shape(n.input[0])
    if x is None or len(x) != 4 or None in x or len(n.input) < 5:
        return None
    starts, ends, axes, steps = (c.const(i) for i in n.input[1:5])
    if any(v is None for v in (starts, ends, axes, steps)):
        return None
    spec = {int(a) % 4: (int(s), int(e), int(k)) for a, s, e, k in zip(axes, starts, ends, steps)}
    if set(spec) != {2, 3} or any(k != 2 for _, _, k in spec.values()):
        return None
    lo, hi = [], []
    for a in (2, 3):
        s, e, _ = spec[a]
        s, e = (s + x[a] if s < 0 else s), (e + x[a] if e < 0 else e)  # ONNX: negative counts from the end
        s, e = min(max(s, 0), x[a]), min(max(e, 0), x[a])
        if s >= e:
            return None
        lo.append(s)
        hi.append(e)
    return 2, lo, hi


CHANNEL_PAD_MARK = "xnnq.tidl_fix: channel Pad as an identity 1x1 Conv"
# TIDL quantizes a float graph's weights itself, power-of-2 and symmetric on max |w| (xnnq.layers.
# weight_scale_from_max): with max |w| = 1 the step is 2^-7 and 1.0 saturates to 127/128. One weight of -2
# in a padded channel's row makes the step 2^-6 (1.0 = code 64, -2 = code -128, also in 16 bits); that
# channel computes -2·x ≤ 0 on the unsigned input and the range Clip [0, hi] after the Conv (its uint
# saturation in TIDL) gives 0, the padded zero. The QDQ export writes plain zero rows instead (its weight
# scale is explicit).
CHANNEL_PAD_GUARD = -2.0


def _pad_spec(c: _Ctx, n: onnx.NodeProto) -> tuple[int, int, list[int]] | None:
    """(channels before, channels after, H/W pads [top, left, bottom, right]) of a constant-zero Pad that
    adds zero channels (axis 1) to a static 4-D tensor, no batch padding, no negative pads; else None."""
    if _attr(n, "mode", "constant") != "constant":
        return None
    if len(n.input) > 2 and n.input[2]:
        value = c.const(n.input[2])
        if value is None or (value.size and float(value.reshape(-1)[0]) != 0.0):
            return None
    pads = c.const(n.input[1]) if len(n.input) > 1 and n.input[1] else np.asarray(_attr(n, "pads", []) or [])
    x = c.shape(n.input[0])
    if pads is None or x is None or len(x) != 4 or None in x:
        return None
    axes = c.const(n.input[3]) if len(n.input) > 3 and n.input[3] else np.arange(4)
    if axes is None or len(pads) != 2 * len(axes):
        return None
    lo, hi = [0] * 4, [0] * 4
    for a, b, e in zip(axes, pads[: len(axes)], pads[len(axes) :]):
        lo[int(a) % 4], hi[int(a) % 4] = int(b), int(e)
    if lo[0] or hi[0] or min(lo + hi) < 0 or not (lo[1] or hi[1]):
        return None
    return lo[1], hi[1], [lo[2], lo[3], hi[2], hi[3]]


def _is_pass_through(c: _Ctx, n: onnx.NodeProto) -> bool:
    """Ops whose outputs are input values: the range-preserving table and a 1x1 MaxPool (a fixed Slice)."""
    if n.op_type == "MaxPool":
        return list(_attr(n, "kernel_shape") or []) == [1, 1] and not any(_spatial(n, "pads", 0, 4))
    return n.op_type in PRESERVING_ONNX_OPS


def _range_source(c: _Ctx, tensor: str) -> onnx.NodeProto | None:
    """The ``Clip`` whose output reaches ``tensor`` through pass-through ops only, else None."""
    for _ in range(64):
        n = c.prod.get(tensor)
        if n is None:
            return None
        if n.op_type == "Clip":
            return n
        if not _is_pass_through(c, n):
            return None
        tensor = n.input[0]
    return None


def _fresh(base: str, taken: set[str]) -> str:
    """``base``, or ``base_1``, ``base_2``... the first name not in ``taken`` (then taken)."""
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def _channel_pad_fix(c: _Ctx, n: onnx.NodeProto, taken: set[str]):
    """The nodes and initializers replacing a channel Pad of a float graph whose input is a quantized unsigned
    tensor (identity 1x1 Conv with zero rows for the padded channels but the guard weight, a Clip with the
    input's range, a width/height Pad if any), else None."""
    spec = _pad_spec(c, n)
    if spec is None or c.qdq:
        return None
    before, after, hw = spec
    src = _range_source(c, n.input[0])
    bounds = None
    if src is not None:
        lo = c.const(src.input[1]) if len(src.input) > 1 and src.input[1] else None
        hi = c.const(src.input[2]) if len(src.input) > 2 and src.input[2] else None
        lo = -math.inf if lo is None else float(np.asarray(lo).reshape(-1)[0])
        hi = math.inf if hi is None else float(np.asarray(hi).reshape(-1)[0])
        bounds = (lo, hi)
    if bounds is None or bounds[0] != 0.0 or not bounds[1] > 0.0:
        return None  # an unsigned quantized input only: see CHANNEL_PAD_GUARD

    cin = int(c.shape(n.input[0])[1])
    cout = before + cin + after
    w = np.zeros((cout, cin, 1, 1), dtype=np.float32)
    w[before + np.arange(cin), np.arange(cin), 0, 0] = 1.0
    w[0 if before else cout - 1, 0, 0, 0] = CHANNEL_PAD_GUARD
    base = f"{_name(n)}_as_conv"
    wname, bname = _fresh(f"{base}.weight", taken), _fresh(f"{base}.bias", taken)
    inits = [numpy_helper.from_array(w, wname), numpy_helper.from_array(np.zeros(cout, np.float32), bname)]
    out = n.output[0]
    conv_out = _fresh(f"{out}_conv", taken) if bounds is not None or any(hw) else out
    conv = helper.make_node(
        "Conv", [n.input[0], wname, bname], [conv_out], name=_fresh(base, taken), kernel_shape=[1, 1]
    )
    conv.doc_string = CHANNEL_PAD_MARK
    nodes = [conv]
    if bounds is not None:
        clip_out = _fresh(f"{out}_clip", taken) if any(hw) else out
        lo_name, hi_name = _fresh(f"{base}_clip_min", taken), _fresh(f"{base}_clip_max", taken)
        inits += [
            numpy_helper.from_array(np.array(bounds[0], np.float32), lo_name),
            numpy_helper.from_array(np.array(bounds[1], np.float32), hi_name),
        ]
        clip = helper.make_node(
            "Clip", [conv_out, lo_name, hi_name], [clip_out], name=_fresh(f"{base}_clip", taken)
        )
        clip.doc_string = CHANNEL_PAD_MARK
        nodes.append(clip)
        conv_out = clip_out
    if any(hw):
        pname = _fresh(f"{base}_hw_pads", taken)
        inits.append(
            numpy_helper.from_array(np.array([0, 0, hw[0], hw[1], 0, 0, hw[2], hw[3]], np.int64), pname)
        )
        nodes.append(helper.make_node("Pad", [conv_out, pname], [out], name=_name(n), mode="constant"))
    what = (
        f"{_name(n)}: Pad of {before}+{after} zero channels -> 1x1 Conv (identity on the {cin} input channels, "
        f"zero rows for the padded ones but one {CHANNEL_PAD_GUARD} guard weight, bias 0)"
        + (f" + Clip [{bounds[0]}, {bounds[1]}] (the input's range)" if bounds is not None else "")
        + (f" + Pad {hw} of height/width" if any(hw) else "")
    )
    return nodes, inits, what


def channel_pad_convs(
    model: onnx.ModelProto,
) -> list[tuple[onnx.NodeProto, onnx.NodeProto | None, str | None]]:
    """The 1x1 Convs ``tidl_fix`` put in place of channel Pads of a float graph: (Conv, its range Clip or
    None, the output tensor of the Clip whose range it keeps, or None)."""
    c = _Ctx(model, None, None, None)
    out = []
    for n in model.graph.node:
        if n.op_type == "Conv" and n.doc_string == CHANNEL_PAD_MARK:
            users = c.users.get(n.output[0], [])
            clip = next((u for u in users if u.op_type == "Clip" and u.doc_string == CHANNEL_PAD_MARK), None)
            src = _range_source(c, n.input[0])
            out.append((n, clip, None if src is None else src.output[0]))
    return out


def tidl_fix(model: onnx.ModelProto, target: str | Target | None = None) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` with the exact fixes applied; returns it and one line per fix."""
    c = _Ctx(
        onnx.ModelProto.FromString(model.SerializeToString()),
        None if target is None else get_target(target),
        None,
        None,
    )
    model = c.model
    fixes: list[str] = []
    new_nodes, new_inits = [], []
    taken = (
        {o for n in c.graph.node for o in n.output}
        | {n.name for n in c.graph.node}
        | set(c.inits)
        | {i.name for i in c.graph.input}
    )
    for n in c.graph.node:
        if (
            n.op_type == "Resize"
            and _resize_scales(c, n) is None
            and (sc := _sizes_to_scales(c, n)) is not None
        ):
            name = f"{_name(n)}_scales"
            new_inits.append(numpy_helper.from_array(sc, name))
            ins = list(n.input[:2]) + [name]
            del n.input[:]
            n.input.extend(ins)
            fixes.append(f"{_name(n)}: Resize sizes -> constant scales {sc.tolist()}")
        elif n.op_type == "Slice" and (sp := _slice_as_pool(c, n)) is not None:
            k, lo, hi = sp
            x = c.shape(n.input[0])
            src, nodes, part = n.input[0], [], ""
            if lo != [0, 0] or hi != x[2:]:  # the rows and columns first (step 1), then every k-th
                src = _fresh(f"{_name(n)}_part", taken)
                names = [_fresh(f"{src}_{what}", taken) for what in ("starts", "ends", "axes", "steps")]
                for name, v in zip(names, (lo, hi, [2, 3], [1, 1])):
                    new_inits.append(numpy_helper.from_array(np.asarray(v, dtype=np.int64), name))
                nodes.append(helper.make_node("Slice", [n.input[0], *names], [src], name=src))
                part = f" after a step-1 Slice of rows {lo[0]}:{hi[0]}, columns {lo[1]}:{hi[1]}"
            nodes.append(
                helper.make_node(
                    "MaxPool", [src], [n.output[0]], name=_name(n), kernel_shape=[1, 1], strides=[k, k]
                )
            )
            new_nodes.append((n, nodes))
            fixes.append(f"{_name(n)}: Slice with step {k} on H and W -> MaxPool kernel 1x1 stride {k}{part}")
        elif n.op_type == "AveragePool":
            x = c.shape(n.input[0])
            k = list(_attr(n, "kernel_shape") or [])
            if (
                x
                and len(x) == 4
                and k == x[2:]
                and not any(_spatial(n, "pads", 0, 4))
                and _attr(n, "auto_pad", "NOTSET") in ("NOTSET", "VALID")
            ):
                new_nodes.append(
                    (n, helper.make_node("GlobalAveragePool", [n.input[0]], [n.output[0]], name=_name(n)))
                )
                fixes.append(
                    f"{_name(n)}: AveragePool over the whole {x[2]}x{x[3]} input -> GlobalAveragePool"
                )
        elif n.op_type == "Pad" and (cp := _channel_pad_fix(c, n, taken)) is not None:
            nodes, inits, what = cp
            new_nodes.append((n, nodes))
            new_inits.extend(inits)
            fixes.append(what)
    for old, new in new_nodes:
        idx = list(c.graph.node).index(old)
        c.graph.node.remove(old)
        for k, node in enumerate(new if isinstance(new, list) else [new]):
            c.graph.node.insert(idx + k, node)
    c.graph.initializer.extend(new_inits)
    drop_unused_initializers(model)
    if model.ir_version > MAX_IR:
        need = helper.find_min_ir_version_for(list(model.opset_import), True)
        if need <= MAX_IR:
            fixes.append(f"IR version {model.ir_version} -> {need} (the lowest the opset allows)")
            model.ir_version = need
    unshaped = [
        o.name
        for o in model.graph.output
        if not o.type.tensor_type.HasField("shape")
        or any(not d.HasField("dim_value") for d in o.type.tensor_type.shape.dim)
    ]
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    shaped = [
        o.name
        for o in model.graph.output
        if o.name in unshaped
        and o.type.tensor_type.HasField("shape")
        and all(d.HasField("dim_value") for d in o.type.tensor_type.shape.dim)
    ]
    if shaped:
        fixes.append(f"shape inference: recorded the static shapes of {', '.join(shaped)}")
    return model, fixes
