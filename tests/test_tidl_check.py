"""TIDL importer rules (xnnq.export.tidl_check): one small ONNX model per rule, built with onnx.helper.

Each case breaks exactly one documented rule; the test asserts that the violation names that node and
that rule, carries a source and a fix, and that a clean model gives no violation at all. The exact
fixes (tidl_fix) are checked to compute the same outputs in onnxruntime and to clear the violation.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import xnnq
from xnnq.export.check import OnnxRunner, ort_session
from xnnq.export.emulate import tidl_emulation
from xnnq.export.reference import run as reference
from xnnq.export.tidl_check import RULES, TIDL_ONNX_OPS, Violation, tidl_check, tidl_fix
from xnnq.models.cifar_resnet import resnet20

from conftest import observe

F = TensorProto.FLOAT


def vi(name, shape, dtype=F):
    return helper.make_tensor_value_info(name, dtype, shape)


def const(name, value, dtype=None):
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def mk(nodes, inputs, outputs, inits=(), opset=18, ir=8):
    g = helper.make_graph(nodes, "t", inputs, outputs, initializer=list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = ir
    return m


def one(op, ins, attrs=None, inits=(), x=(1, 8, 8, 8), y=None, name="n0", extra_inputs=(), opset=18, ir=8):
    """A one-node model: input ``x`` (static shape), node ``name`` of type ``op``, output ``y``."""
    node = helper.make_node(op, ["x", *ins], ["y"], name=name, **(attrs or {}))
    return mk([node], [vi("x", list(x)), *extra_inputs], [vi("y", y)], inits, opset, ir)


def w(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def conv(k=3, s=1, cin=8, cout=8, group=1, pads=None, x=(1, 8, 8, 8), **kw):
    strides = s if isinstance(s, list) else [s, s]
    kk = k if isinstance(k, list) else [k, k]
    attrs = {"kernel_shape": kk, "strides": strides, "group": group, **kw}
    if pads is not None:
        attrs["pads"] = pads
    return one("Conv", ["w"], attrs, [const("w", w((cout, cin // group, *kk)))], x=x)


def resize(scales=None, sizes=None, x=(1, 8, 8, 8), **attrs):
    inits = [const("roi", np.zeros(0, np.float32))]
    ins = ["roi"]
    if scales is not None:
        inits.append(const("scales", scales, np.float32))
        ins.append("scales")
    else:
        inits += [const("sizes", sizes, np.int64)]
        ins += ["", "sizes"]
    return one(
        "Resize",
        ins,
        {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor", **attrs},
        inits,
        x=x,
    )


def qdq_model(scale, zp, zp_dtype=np.int8, axis=None, cw=None):
    """x -> QuantizeLinear -> DequantizeLinear -> y (activation QDQ)."""
    attrs = {} if axis is None else {"axis": axis}
    inits = [const("s", scale, np.float32), const("z", zp, zp_dtype)]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q0", **attrs),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq0", **attrs),
    ]
    return mk(nodes, [vi("x", [1, 8, 8, 8])], [vi("y", None)], inits)


def qdq_conv(bias_codes):
    """A QDQ conv with int8 weights (scale 2^-7) and an int32 bias (scale 2^-12)."""
    inits = [
        const("xs", 2.0**-5, np.float32),
        const("xz", 0, np.int8),
        const("wq", np.ones((4, 4, 3, 3)), np.int8),
        const("ws", 2.0**-7, np.float32),
        const("wz", 0, np.int8),
        const("bq", bias_codes, np.int32),
        const("bs", 2.0**-12, np.float32),
        const("bz", 0, np.int32),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q0"),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dq0"),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], name="dqw"),
        helper.make_node("DequantizeLinear", ["bq", "bs", "bz"], ["bd"], name="dqb"),
        helper.make_node("Conv", ["xd", "wd", "bd"], ["y"], name="conv0", kernel_shape=[3, 3]),
    ]
    return mk(nodes, [vi("x", [1, 4, 8, 8])], [vi("y", [1, 4, 6, 6])], inits)


PRE = {"advanced_options:prequantized_model": 1, "advanced_options:quantization_scale_type": 1}

# (case id, model factory, target, options, rule id, node name, severity)
CASES = [
    ("unsupported op", lambda: one("Softplus", []), None, None, "graph.unsupported_op", "n0", "error"),
    ("fused-only op", lambda: one("Identity", []), None, None, "graph.fused_only", "n0", "error"),
    (
        "dynamic shape",
        lambda: mk(
            [helper.make_node("Relu", ["x"], ["y"], name="n0")], [vi("x", ["N", 8, 8, 8])], [vi("y", None)]
        ),
        None,
        None,
        "graph.static_shapes",
        "x",
        "error",
    ),
    ("opset", lambda: one("Relu", [], opset=21, ir=10), None, None, "graph.opset", "<model>", "warning"),
    ("IR version", lambda: one("Relu", [], ir=10), None, None, "graph.ir_version", "<model>", "warning"),
    ("conv strides", lambda: conv(s=[1, 2]), None, None, "Conv.stride_equal", "n0", "error"),
    (
        "conv 9x9 s2",
        lambda: conv(k=9, s=2, x=(1, 8, 32, 32)),
        None,
        None,
        "Conv.kernel_gt7_stride2",
        "n0",
        "error",
    ),
    ("conv stride 4", lambda: conv(k=3, s=4, x=(1, 8, 32, 32)), None, None, "Conv.stride4", "n0", "error"),
    (
        "depthwise 3x3 s3",
        lambda: conv(k=3, s=3, group=8, x=(1, 8, 12, 12)),
        None,
        None,
        "Conv.depthwise_kernel",
        "n0",
        "error",
    ),
    (
        "depthwise 9x9",
        lambda: conv(k=9, s=1, group=8, x=(1, 8, 16, 16)),
        None,
        None,
        "Conv.depthwise_kernel",
        "n0",
        "error",
    ),
    (
        "conv 3x3 s3 on AM62A",
        lambda: conv(k=3, s=3, x=(1, 8, 12, 12)),
        "AM62A",
        None,
        "Conv.3x3_stride3",
        "n0",
        "error",
    ),
    (
        "conv pad > width on AM67A",
        lambda: conv(k=3, x=(1, 8, 4, 4), pads=[5, 5, 5, 5]),
        "AM67A",
        None,
        "Conv.pad_gt_width",
        "n0",
        "error",
    ),
    (
        "conv variable weight",
        lambda: one("Conv", ["w"], {"kernel_shape": [3, 3]}, extra_inputs=[vi("w", [8, 8, 3, 3])]),
        None,
        None,
        "Conv.variable_weight",
        "n0",
        "error",
    ),
    (
        "deconv 5x5",
        lambda: one(
            "ConvTranspose", ["w"], {"kernel_shape": [5, 5], "strides": [2, 2]}, [const("w", w((8, 8, 5, 5)))]
        ),
        None,
        None,
        "ConvTranspose.kernel_stride",
        "n0",
        "error",
    ),
    (
        "deconv 16-bit on AM62A",
        lambda: one(
            "ConvTranspose", ["w"], {"kernel_shape": [2, 2], "strides": [2, 2]}, [const("w", w((8, 8, 2, 2)))]
        ),
        "AM62A",
        {"advanced_options:output_feature_16bit_names_list": "y"},
        "ConvTranspose.16bit",
        "n0",
        "error",
    ),
    (
        "pool dilation",
        lambda: one("MaxPool", [], {"kernel_shape": [2, 2], "strides": [2, 2], "dilations": [2, 2]}),
        None,
        None,
        "Pool.dilation",
        "n0",
        "error",
    ),
    (
        "pool 5x5",
        lambda: one("MaxPool", [], {"kernel_shape": [5, 5], "strides": [1, 1]}),
        None,
        None,
        "Pool.validated_sizes",
        "n0",
        "warning",
    ),
    (
        "global pool plane",
        lambda: one("GlobalAveragePool", [], x=(1, 8, 64, 64)),
        None,
        None,
        "Pool.global_plane",
        "n0",
        "error",
    ),
    (
        "sum of 3",
        lambda: one("Sum", ["x2", "x3"], extra_inputs=[vi("x2", [1, 8, 8, 8]), vi("x3", [1, 8, 8, 8])]),
        None,
        None,
        "Eltwise.inputs",
        "n0",
        "error",
    ),
    (
        "add const without shapes",
        lambda: mk(
            [
                helper.make_node("Relu", ["x"], ["r"], name="r0"),
                helper.make_node("Add", ["r", "c"], ["y"], name="n0"),
            ],
            [vi("x", [1, 8, 8, 8])],
            [vi("y", None)],
            [const("c", w((1, 8, 1, 1)))],
        ),
        None,
        None,
        "Eltwise.shape_inference",
        "n0",
        "error",
    ),
    (
        "gemm transA",
        lambda: one("Gemm", ["b"], {"transA": 1}, [const("b", w((8, 4)))], x=(8, 1)),
        None,
        None,
        "Gemm.attrs",
        "n0",
        "error",
    ),
    (
        "gemm bias shape",
        lambda: one("Gemm", ["b", "c"], {}, [const("b", w((8, 4))), const("c", w((2, 4)))], x=(2, 8)),
        None,
        None,
        "Gemm.bias_shape",
        "n0",
        "error",
    ),
    ("softmax axis", lambda: one("Softmax", [], {"axis": 1}), None, None, "Softmax.axis", "n0", "error"),
    (
        "concat batch",
        lambda: one("Concat", ["x2"], {"axis": 0}, extra_inputs=[vi("x2", [1, 8, 8, 8])]),
        None,
        None,
        "Concat.axis",
        "n0",
        "error",
    ),
    (
        "concat 5-D axis 1",
        lambda: one(
            "Concat", ["x2"], {"axis": 1}, x=(1, 2, 3, 4, 5), extra_inputs=[vi("x2", [1, 2, 3, 4, 5])]
        ),
        None,
        None,
        "Concat.axis",
        "n0",
        "error",
    ),
    (
        "slice stride",
        lambda: one(
            "Slice",
            ["st", "en", "ax", "sp"],
            {},
            [
                const("st", [0, 0], np.int64),
                const("en", [8, 8], np.int64),
                const("ax", [2, 3], np.int64),
                const("sp", [3, 3], np.int64),
            ],
        ),
        None,
        None,
        "Slice.stride",
        "n0",
        "error",
    ),
    (
        "slice batch",
        lambda: one(
            "Slice",
            ["st", "en", "ax"],
            {},
            [const("st", [0], np.int64), const("en", [1], np.int64), const("ax", [0], np.int64)],
            x=(2, 8, 8, 8),
        ),
        None,
        None,
        "Slice.batch",
        "n0",
        "error",
    ),
    (
        "resize cubic",
        lambda: resize([1, 1, 2, 2], mode="cubic", coordinate_transformation_mode="half_pixel"),
        None,
        None,
        "Resize.mode",
        "n0",
        "error",
    ),
    ("resize sizes", lambda: resize(sizes=[1, 8, 16, 16]), None, None, "Resize.sizes", "n0", "error"),
    ("resize x3", lambda: resize([1, 1, 3, 3]), None, None, "Resize.power2", "n0", "error"),
    ("resize h != w", lambda: resize([1, 1, 2, 4]), None, None, "Resize.hw_equal", "n0", "error"),
    ("resize down", lambda: resize([1, 1, 0.5, 0.5]), None, None, "Resize.downscale", "n0", "error"),
    ("resize channels", lambda: resize([1, 2, 2, 2]), None, None, "Resize.axes", "n0", "error"),
    (
        "resize align_corners",
        lambda: resize([1, 1, 2, 2], mode="linear", coordinate_transformation_mode="align_corners"),
        None,
        None,
        "Resize.coordinate_mode",
        "n0",
        "error",
    ),
    (
        "resize nearest half_pixel floor",
        lambda: resize(
            [1, 1, 2, 2], coordinate_transformation_mode="half_pixel", nearest_mode="round_prefer_floor"
        ),
        None,
        None,
        "Resize.nearest_mode",
        "n0",
        "error",
    ),
    (
        "resize linear asymmetric",
        lambda: resize([1, 1, 2, 2], mode="linear"),
        None,
        None,
        "Resize.linear_asymmetric",
        "n0",
        "error",
    ),
    (
        "clip above 0",
        lambda: one("Clip", ["lo", "hi"], {}, [const("lo", 1.0, np.float32), const("hi", 6.0, np.float32)]),
        None,
        None,
        "Clip.bounds",
        "n0",
        "error",
    ),
    (
        "pad reflect",
        lambda: one("Pad", ["p"], {"mode": "reflect"}, [const("p", [0, 0, 1, 1, 0, 0, 1, 1], np.int64)]),
        None,
        None,
        "Pad.mode",
        "n0",
        "error",
    ),
    (
        "pad channels",
        lambda: one("Pad", ["p"], {}, [const("p", [0, 4, 0, 0, 0, 4, 0, 0], np.int64)]),
        None,
        None,
        "Pad.axes",
        "n0",
        "error",
    ),
    (
        "pad value",
        lambda: one(
            "Pad",
            ["p", "v"],
            {},
            [const("p", [0, 0, 1, 1, 0, 0, 1, 1], np.int64), const("v", 1.0, np.float32)],
        ),
        None,
        None,
        "Pad.value",
        "n0",
        "error",
    ),
    (
        "reshape variable shape",
        lambda: one("Reshape", ["shp"], extra_inputs=[vi("shp", [2], TensorProto.INT64)]),
        None,
        None,
        "Reshape.shape",
        "n0",
        "error",
    ),
    ("argmax axis", lambda: one("ArgMax", [], {"axis": 3}), None, None, "ArgMax.attrs", "n0", "error"),
    (
        "depth-to-space channels",
        lambda: one("DepthToSpace", [], {"blocksize": 3}),
        None,
        None,
        "DepthToSpace.channels",
        "n0",
        "error",
    ),
    (
        "batchnorm training",
        lambda: one(
            "BatchNormalization",
            ["g", "b", "m", "v"],
            {"training_mode": 1},
            [const(k, np.ones(8), np.float32) for k in "gbmv"],
        ),
        None,
        None,
        "BatchNormalization.training",
        "n0",
        "error",
    ),
    (
        "cast inside",
        lambda: mk(
            [
                helper.make_node("Relu", ["x"], ["r"], name="r0"),
                helper.make_node("Cast", ["r"], ["c"], name="n0", to=TensorProto.FLOAT),
                helper.make_node("Relu", ["c"], ["y"], name="r1"),
            ],
            [vi("x", [1, 8, 8, 8])],
            [vi("y", None)],
        ),
        None,
        None,
        "Cast.position",
        "n0",
        "error",
    ),
    ("7-D relu", lambda: one("Relu", [], x=(2, 2, 2, 2, 2, 2, 2)), None, None, "Relu.dims", "n0", "error"),
    ("int16 QDQ", lambda: qdq_model(2.0**-8, 0, np.int16), None, PRE, "QDQ.8bit", "q0", "error"),
    ("non-power-of-2 on TDA4VM", lambda: qdq_model(0.03, 0), "TDA4VM", PRE, "QDQ.power2", "q0", "error"),
    ("zero-point on TDA4VM", lambda: qdq_model(2.0**-5, 3), "TDA4VM", PRE, "QDQ.zero_point", "q0", "error"),
    (
        "per-channel activation",
        lambda: qdq_model([2.0**-5] * 8, [0] * 8, axis=2),
        None,
        PRE,
        "QDQ.axis",
        "q0",
        "error",
    ),
    (
        "per-channel on TDA4VM",
        lambda: qdq_model([2.0**-5] * 8, [0] * 8),
        "TDA4VM",
        PRE,
        "QDQ.per_channel",
        "q0",
        "error",
    ),
    (
        "QDQ without prequantized option",
        lambda: qdq_model(2.0**-5, 0),
        None,
        {"advanced_options:quantization_scale_type": 1},
        "options.prequantized_model",
        "<options>",
        "error",
    ),
    (
        "scale type 4 on TDA4VM",
        lambda: one("Relu", []),
        "TDA4VM",
        {"advanced_options:quantization_scale_type": 4},
        "options.scale_type",
        "<options>",
        "error",
    ),
    (
        "scale type 1 with free scales",
        lambda: qdq_model(0.03, 0),
        "AM69A",
        PRE,
        "options.scale_type",
        "<options>",
        "error",
    ),
    (
        "16-bit name not in graph",
        lambda: one("Relu", []),
        None,
        {"advanced_options:output_feature_16bit_names_list": "nope"},
        "options.16bit_names",
        "<options>",
        "error",
    ),
    (
        "bias beyond 16 bits on TDA4VM",
        lambda: qdq_conv(np.full(4, 40000)),
        "TDA4VM",
        PRE,
        "Bias.width",
        "conv0",
        "warning",
    ),
]


@pytest.mark.parametrize(
    "case,factory,target,options,rule_id,node,severity", CASES, ids=[c[0] for c in CASES]
)
def test_each_rule_names_the_node(case, factory, target, options, rule_id, node, severity):
    model = factory()
    found = tidl_check(model, target, options=options)
    hits = [v for v in found if v.rule == rule_id]
    assert hits, f"{case}: expected {rule_id}, got {[v.rule for v in found]}"
    v = hits[0]
    assert v.node == node and v.severity == severity
    assert v.source.startswith("TexasInstruments/") and v.fix and v.message
    assert node in str(v) and rule_id in str(v)


def test_rules_that_are_chip_specific_stay_on_their_chip():
    m = conv(k=3, s=3, x=(1, 8, 12, 12))
    assert "Conv.3x3_stride3" not in {v.rule for v in tidl_check(m, "AM69A")}
    assert "Conv.3x3_stride3" not in {v.rule for v in tidl_check(m, None)}
    assert "Conv.3x3_stride3" in {v.rule for v in tidl_check(m, "AM67A")}
    bias = qdq_conv(np.full(4, 40000))
    assert "Bias.width" not in {v.rule for v in tidl_check(bias, "AM69A", options=PRE)}
    assert "Bias.width" not in {v.rule for v in tidl_check(qdq_conv(np.full(4, 1000)), "TDA4VM", options=PRE)}


def test_clean_models_give_no_violation():
    clean = mk(
        [
            helper.make_node(
                "Conv", ["x", "w", "b"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]
            ),
            helper.make_node("Relu", ["c"], ["r"], name="relu"),
            helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
            helper.make_node(
                "Resize",
                ["p", "", "s"],
                ["u"],
                name="up",
                mode="nearest",
                coordinate_transformation_mode="asymmetric",
                nearest_mode="floor",
            ),
            helper.make_node("Concat", ["u", "r"], ["y"], name="cat", axis=1),
        ],
        [vi("x", [1, 8, 8, 8])],
        [vi("y", [1, 16, 8, 8])],
        [
            const("w", w((8, 8, 3, 3))),
            const("b", np.zeros(8), np.float32),
            const("s", [1, 1, 2, 2], np.float32),
        ],
    )
    for target in (None, "TDA4VM", "AM62A", "AM67A", "AM68A", "AM69A"):
        assert tidl_check(clean, target) == []
    assert tidl_check(qdq_conv(np.full(4, 100)), "TDA4VM", options=PRE) == []


def test_every_documented_op_has_the_dimension_rule_and_violations_print():
    assert {"Conv", "Resize", "Concat", "Pad", "Slice", "Clip"} <= set(RULES)
    assert all(op in TIDL_ONNX_OPS for op in RULES)
    v = Violation("n", "Conv", "Conv.x", "bad", "do y", "TexasInstruments/x", "error", True)
    assert str(v).startswith("[error] n (Conv): Conv.x: bad. Fix: do y (tidl_fix does this)")


# ------------------------------------------------------------------------------------------ fixes
def run(model, x):
    return ort_session(model).run(None, {"x": x})[0]


@pytest.mark.parametrize(
    "name,factory,rule_id,shape",
    [
        ("resize sizes -> scales", lambda: resize(sizes=[1, 8, 16, 16]), "Resize.sizes", (1, 8, 8, 8)),
        (
            "strided slice -> maxpool",
            lambda: one(
                "Slice",
                ["st", "en", "ax", "sp"],
                {},
                [
                    const("st", [0, 0], np.int64),
                    const("en", [2**62, 2**62], np.int64),
                    const("ax", [2, 3], np.int64),
                    const("sp", [2, 2], np.int64),
                ],
                x=(1, 8, 7, 9),
            ),
            "Slice.stride",
            (1, 8, 7, 9),
        ),
        *[
            (
                f"strided slice from {st} to {en} -> slice + maxpool",
                lambda st=st, en=en: one(
                    "Slice",
                    ["st", "en", "ax", "sp"],
                    {},
                    [
                        const("st", st, np.int64),
                        const("en", en, np.int64),
                        const("ax", [2, 3], np.int64),
                        const("sp", [2, 2], np.int64),
                    ],
                    x=(1, 8, 7, 9),
                ),
                "Slice.stride",
                (1, 8, 7, 9),
            )
            for st, en in (([1, 0], [2**62, 2**62]), ([0, 1], [2**62, 2**62]), ([1, 2], [6, -1]))
        ],
        (
            "whole-plane avgpool -> global",
            lambda: one("AveragePool", [], {"kernel_shape": [8, 8]}),
            "Pool.validated_sizes",
            (1, 8, 8, 8),
        ),
        ("IR version", lambda: one("Relu", [], ir=10), "graph.ir_version", (1, 8, 8, 8)),
    ],
)
def test_fixes_are_exact_and_clear_the_violation(name, factory, rule_id, shape):
    model = factory()
    before = [v for v in tidl_check(model) if v.rule == rule_id]
    assert before and before[0].fixable
    fixed, fixes = tidl_fix(model)
    assert len([f for f in fixes if not f.startswith("shape inference")]) == 1
    onnx.checker.check_model(fixed, full_check=True)
    assert not tidl_check(fixed)  # no rule broken by what the fix wrote either
    assert not [v for v in tidl_check(fixed) if v.rule == rule_id]
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    np.testing.assert_array_equal(run(fixed, x), run(model, x))


def test_fix_leaves_what_it_cannot_fix():
    model = one(
        "Slice",
        ["st", "en", "ax", "sp"],
        {},
        [
            const("st", [0, 0], np.int64),
            const("en", [8, 8], np.int64),
            const("ax", [2, 3], np.int64),
            const("sp", [3, 3], np.int64),
        ],
    )  # every third row and column: no pool of a validated stride
    assert not next(v for v in tidl_check(model) if v.rule == "Slice.stride").fixable
    fixed, fixes = tidl_fix(model)
    assert not [f for f in fixes if not f.startswith("shape inference")]
    assert [n.op_type for n in fixed.graph.node] == ["Slice"]


# ------------------------------------------------------------------- channel Pad -> identity 1x1 Conv
def channel_pad(lo=0.0, hw=(0, 0, 0, 0)):
    """Clip [lo, 4] then a Pad of 2 zero channels before and 3 after (and ``hw`` on H/W)."""
    t, left, b, r = hw
    return mk(
        [
            helper.make_node("Clip", ["x", "lo", "hi"], ["q"], name="q"),
            helper.make_node("Pad", ["q", "pads"], ["y"], name="pad", mode="constant"),
        ],
        [vi("x", [1, 4, 5, 6])],
        [vi("y", None)],
        [
            const("lo", lo, np.float32),
            const("hi", 4.0, np.float32),
            const("pads", [0, 2, t, left, 0, 3, b, r], np.int64),
        ],
    )


@pytest.mark.parametrize("hw", [(0, 0, 0, 0), (1, 0, 2, 1)])
def test_channel_pad_becomes_an_identity_conv(hw):
    model = channel_pad(hw=hw)
    before = [v for v in tidl_check(model) if v.rule == "Pad.axes"]
    assert before and before[0].fixable
    fixed, fixes = tidl_fix(model)
    assert any("1x1 Conv" in f for f in fixes)
    onnx.checker.check_model(fixed, full_check=True)
    assert not [v for v in tidl_check(fixed) if v.rule.startswith("Pad.")]
    ops = [n.op_type for n in fixed.graph.node]
    assert ops == ["Clip", "Conv", "Clip"] + (["Pad"] if any(hw) else [])
    conv = fixed.graph.node[1]
    wt = numpy_helper.to_array(next(t for t in fixed.graph.initializer if t.name == conv.input[1]))
    assert wt.shape == (9, 4, 1, 1)
    np.testing.assert_array_equal(wt[2:6, :, 0, 0], np.eye(4, dtype=np.float32))
    assert (wt[6:] == 0).all() and (wt[:2] <= 0).all()  # padded rows: zero but the guard weight
    x = np.random.default_rng(1).uniform(-1, 5, (1, 4, 5, 6)).astype(np.float32)
    np.testing.assert_array_equal(run(fixed, x), run(model, x))


def test_channel_pad_of_a_signed_or_unquantized_tensor_is_left():
    for model in (
        channel_pad(lo=-4.0),
        one("Pad", ["pads"], {}, [const("pads", [0, 1, 0, 0, 0, 1, 0, 0], np.int64)]),
    ):
        v = next(v for v in tidl_check(model) if v.rule == "Pad.axes")
        assert not v.fixable
        fixed, fixes = tidl_fix(model)
        assert "Pad" in [n.op_type for n in fixed.graph.node]
        assert not [f for f in fixes if "Conv" in f]


class OptionA(torch.nn.Module):
    """A conv branch plus ResNet's option-A shortcut (stride-2 slice, zero channels padded on)."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.c1 = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8))

    def forward(self, x):
        a = self.c1(x)
        pad = torch.nn.functional.pad(a[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2), "constant", 0)
        return torch.relu(self.c2(a) + pad)


def test_channel_pad_fix_in_the_16bit_flows(tmp_path):
    """A 16-bit input quantizer: the float graph lists the new Clip as 16-bit (emulation exact); the QDQ
    format goes through the quantization-parameters file (the 1x1 MaxPool and the Conv have ranges)."""
    torch.manual_seed(0)
    shape = (1, 3, 8, 8)
    q = xnnq.QuantTrainModule(OptionA().eval(), torch.randn(shape), bitwidth_overrides={"c1.2": 16})
    q = observe(q, (torch.randn(4, *shape[1:]) for _ in range(2)), bn_frozen=True)
    x = torch.randn(3, *shape[1:])
    with torch.no_grad():
        sim = q(x).numpy()
    res = xnnq.export_onnx(q, torch.randn(shape), tmp_path / "t.onnx", target="TDA4VM", format="tidl")
    clip = next(n for n in res.model.graph.node if n.op_type == "Clip" and "_as_conv" in n.name)
    ro = json.loads(res.options_path.read_text())["runtime_options"]
    assert clip.output[0] in ro["advanced_options:output_feature_16bit_names_list"].split(",")
    assert np.array_equal(OnnxRunner(tidl_emulation(res.path))(x).numpy(), sim)
    res = xnnq.export_onnx(q, torch.randn(shape), tmp_path / "q.onnx", target="AM68A", format="qdq")
    assert res.flow == "quant_params" and res.quant_params_path.exists()
    assert not [v for v in res.violations if v.rule.startswith("Pad.")]
    onnx.save(res.reference_model, str(tmp_path / "ref.onnx"))
    ort = OnnxRunner(tmp_path / "ref.onnx")(x).numpy()
    assert np.array_equal(ort, sim)
    assert np.array_equal(reference(tmp_path / "ref.onnx", x, rounding="half_even")[0], ort)


@pytest.mark.parametrize("name", ["option_a", "resnet20"])
def test_channel_pad_fix_is_exact_in_both_formats(name, tmp_path):
    torch.manual_seed(0)
    model, shape = (OptionA(), (1, 3, 8, 8)) if name == "option_a" else (resnet20(), (1, 3, 32, 32))
    q = xnnq.QuantTrainModule(model.eval(), torch.randn(shape))
    q = observe(q, (torch.randn(4, *shape[1:]) for _ in range(2)), bn_frozen=True)
    pads = 1 if name == "option_a" else 2
    x = torch.randn(3, *shape[1:])
    with torch.no_grad():
        sim = q(x).numpy()
    for target, fmt in (("TDA4VM", "tidl"), ("AM68A", "qdq")):
        res = xnnq.export_onnx(q, torch.randn(shape), tmp_path / f"{fmt}.onnx", target=target, format=fmt)
        assert not [v for v in res.violations if v.rule.startswith("Pad.")]
        assert len([f for f in res.fixes if "zero channels -> 1x1 Conv" in f]) == pads
        assert "Pad" not in [n.op_type for n in res.model.graph.node]
        if fmt == "tidl":
            assert np.array_equal(OnnxRunner(tidl_emulation(res.path))(x).numpy(), sim)
            continue
        ort = OnnxRunner(res.path)(x).numpy()
        assert np.array_equal(ort, sim)
        assert np.array_equal(reference(res.path, x, rounding="half_even")[0], ort)
        g = res.model.graph
        inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        prod = {o: n for n in g.node for o in n.output}
        convs = [n for n in g.node if n.op_type == "Conv" and "_as_conv" in n.name]
        assert len(convs) == pads
        for conv in convs:
            wdq, bdq = prod[conv.input[1]], prod[conv.input[2]]
            codes, ws = inits[wdq.input[0]], inits[wdq.input[1]]
            assert codes.dtype == np.int8 and set(np.unique(codes)) == {0, 64} and float(ws) == 2.0**-6
            assert inits[bdq.input[0]].dtype == np.int32 and not inits[bdq.input[0]].any()
            (qnode,) = [n for n in g.node if n.input and n.input[0] == conv.output[0]]
            src = prod[conv.input[0]]
            while src.op_type != "DequantizeLinear":
                src = prod[src.input[0]]
            assert qnode.op_type == "QuantizeLinear"
            assert float(inits[qnode.input[1]]) == float(inits[src.input[1]])
            assert float(inits[bdq.input[1]]) == float(inits[src.input[1]]) * 2.0**-6
            assert inits[qnode.input[2]].dtype == inits[src.input[2]].dtype
