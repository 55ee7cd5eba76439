"""The bit-true integer reference (xnnq.export.reference), its rounding modes and TIDL-style traces.

Hand-computed cases on small onnx.helper graphs (ties at the rounding boundary, saturation, operands on
different grids), then onnxruntime as an independent implementation of the same files (bit-exact under
round-half-to-even), then QDQ exports of a small FPN-like segmenter and of ResNet-20 (random weights):
onnxruntime == reference(half_even), simulation(tidl) == reference(tidl).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import xnnq
from xnnq.export.check import OnnxRunner, onnx_check, ort_session
from xnnq.export.reference import IntegerReference, run
from xnnq.export.reference_ops import IntegerReferenceError
from xnnq.export.traces import compare_traces, first_mismatch, read_folder, read_layer_info
from xnnq.layers.rounding import Rounding, Site, resolve, round_div, round_tensor
from xnnq.models.cifar_resnet import resnet20

MODES = ["half_even", "half_up", "half_away", "floor", "tidl"]


# ------------------------------------------------------------------------------- graph builders
class G:
    """A tiny QDQ graph builder: float input → QuantizeLinear → ... → DequantizeLinear output."""

    def __init__(self):
        self.nodes, self.inits, self.n = [], [], 0

    def const(self, value, dtype=None) -> str:
        self.n += 1
        name = f"c{self.n}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def node(self, op, inputs, **attrs) -> str:
        self.n += 1
        out = f"t{self.n}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{op}_{self.n}", **attrs))
        return out

    def q(self, x, scale, dtype=np.int8) -> str:
        s, z = self.const(np.float32(scale)), self.const(np.zeros((), dtype))
        return self.node("DequantizeLinear", [self.node("QuantizeLinear", [x, s, z]), s, z])

    def weight(self, codes, scale, axis=None, dtype=np.int8) -> str:
        scale = np.asarray(scale, np.float32)
        zp = np.zeros(scale.shape, dtype)
        kw = {"axis": axis} if axis is not None else {}
        return self.node(
            "DequantizeLinear", [self.const(codes, dtype), self.const(scale), self.const(zp)], **kw
        )

    def model(self, out, in_shape, opset=13, out_type=TensorProto.FLOAT) -> onnx.ModelProto:
        g = helper.make_graph(
            self.nodes,
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
            [helper.make_tensor_value_info(out, out_type, None)],
            self.inits,
        )
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
        m.ir_version = 8
        return m


def ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort_session(model, optimize=False).run(None, {"x": x.astype(np.float32)})[0]


# ---------------------------------------------------------------------------------- rounding
def test_round_div_modes_at_ties_and_between():
    num = np.array(
        [5, -5, 3, -3, 7, -7, 6, -6, 4]
    )  # /2: ties at 2.5, -2.5, 1.5, -1.5, 3.5, -3.5; 3, -3, 2 exact
    want = {
        "half_even": [2, -2, 2, -2, 4, -4, 3, -3, 2],
        "half_up": [3, -2, 2, -1, 4, -3, 3, -3, 2],
        "half_away": [3, -3, 2, -2, 4, -4, 3, -3, 2],
        "floor": [2, -3, 1, -2, 3, -4, 3, -3, 2],
    }
    for mode, w in want.items():
        assert round_div(num, 2, mode).tolist() == w, mode
        assert round_tensor(torch.tensor(num / 2.0), mode).tolist() == w, mode  # the simulation's rounding
    assert round_div(np.array([9, 10, 11, -9]), 4, "half_even").tolist() == [
        2,
        2,
        3,
        -2,
    ]  # 2.25 2.5 2.75 -2.25
    # TIDL's rule per site
    assert resolve("tidl", Site.REQUANT) is Rounding.HALF_UP
    assert resolve("tidl", Site.INPUT) is Rounding.HALF_AWAY
    assert resolve("tidl", Site.RESIZE) is Rounding.FLOOR
    with pytest.raises(ValueError, match="rounding must be one of"):
        resolve("nearest")


def test_input_quantization_ties_and_saturation():
    g = G()
    out = g.q("x", 0.5)
    m = g.model(out, [1, 8])
    x = np.array(
        [[0.25, 0.75, 1.25, -0.25, -0.75, -1.25, 100.0, -100.0]], np.float32
    )  # codes 0.5, 1.5, 2.5 ...
    want = {
        "half_even": [0, 2, 2, 0, -2, -2, 127, -128],
        "half_up": [1, 2, 3, 0, -1, -2, 127, -128],
        "half_away": [1, 2, 3, -1, -2, -3, 127, -128],
        "tidl": [1, 2, 3, -1, -2, -3, 127, -128],  # TIDL's float input conversion: half away from zero
    }
    for mode, w in want.items():
        assert (run(m, x, rounding=mode)[0] / 0.5).tolist() == [w], mode
    assert np.array_equal(run(m, x, rounding="half_even")[0], ort(m, x))


def conv_graph(bias_code: int, out_dtype=np.int8) -> onnx.ModelProto:
    """x (scale 1/2) → 1x1 Conv with weight code 1 (scale 1/2) + bias on the accumulator grid (1/4) →
    Q (scale 1/2): the output code is (x_code + bias_code) / 2, ties whenever that sum is odd."""
    g = G()
    x = g.q("x", 0.5)
    w = g.weight(np.ones((1, 1, 1, 1)), 0.5)
    b = g.weight(np.array([bias_code]), 0.25, dtype=np.int32)
    y = g.node("Conv", [x, w, b])
    return g.model(g.q(y, 0.5, out_dtype), [1, 1, 1, 6])


def test_conv_requantization_ties_and_saturation():
    m = conv_graph(bias_code=0)
    x = np.array([[[[2.5, 1.5, -1.5, -2.5, 1.0, 60.0]]]], np.float32)  # codes 5, 3, -3, -5, 2, 120
    acc = np.array([5, 3, -3, -5, 2, 120])
    want = {
        "half_even": [2, 2, -2, -2, 1, 60],
        "half_up": [3, 2, -1, -2, 1, 60],
        "half_away": [3, 2, -2, -3, 1, 60],
        "floor": [2, 1, -2, -3, 1, 60],
        "tidl": [3, 2, -1, -2, 1, 60],  # TIDL_roundSat: (acc + 2^(shift-1)) >> shift
    }
    for mode, w in want.items():
        got = run(m, x, rounding=mode)[0] / 0.5
        assert got.ravel().tolist() == w, mode
        assert round_div(acc, 2, resolve(mode)).tolist() == w
    assert np.array_equal(run(m, x, rounding="half_even")[0], ort(m, x))
    # a bias pushes the accumulator past the int8 range: saturation at 127 / -128, uint8 at 0 / 255
    assert run(conv_graph(bias_code=400), x)[0].ravel().tolist() == [63.5] * 6
    assert run(conv_graph(bias_code=-400), x)[0].ravel().tolist() == [-64.0] * 6
    u = run(conv_graph(bias_code=-7, out_dtype=np.uint8), x, rounding="tidl")[0] / 0.5
    assert u.ravel().tolist() == [0, 0, 0, 0, 0, 57]  # (120 - 7) / 2 = 56.5 -> 57 (half up); negatives -> 0
    # an 8-bit layer whose accumulator leaves int32 (TIDL's accumulator for 8-bit operands) is flagged
    with pytest.warns(UserWarning, match="int32"):
        run(conv_graph(bias_code=2**31 - 1), x)


def test_add_concat_mul_on_different_grids():
    g = G()
    half = [g.node("Slice", ["x", g.const([lo]), g.const([lo + 4]), g.const([1])]) for lo in (0, 4)]
    a = g.q(half[0], 0.25)  # codes on 1/4
    b = g.q(half[1], 1 / 16)  # codes on 1/16
    s = g.node("Add", [a, b])  # exact on 1/16 (a's codes shifted left by 2 bits)
    c = g.node("Concat", [a, b], axis=1)  # both on 1/16
    p = g.node("Mul", [a, b])  # product on 1/64
    outs = [g.q(s, 0.5), g.q(c, 0.5), g.q(p, 0.5)]
    x = np.array([[0.25, -0.25, 0.5, 0.25, 0.0, 0.0, 0.1875, 0.5]], np.float32)
    for i, out in enumerate(outs):
        m = g.model(out, [1, 8])
        assert np.array_equal(run(m, x, rounding="half_even")[0], ort(m, x)), i
    # a + b = 0.25, -0.25, 0.6875, 0.75, i.e. 0.5, -0.5, 1.375, 1.5 output steps of 1/2
    want = {
        "half_even": [0, 0, 1, 2],
        "half_up": [1, 0, 1, 2],
        "half_away": [1, -1, 1, 2],
        "floor": [0, -1, 1, 1],
        "tidl": [1, 0, 1, 2],
    }
    m_add = g.model(outs[0], [1, 8])
    for mode, w in want.items():
        assert (run(m_add, x, rounding=mode)[0] / 0.5).ravel().tolist() == w, mode


def test_pools_resize_clip_shape_ops_against_onnxruntime():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
    cases = {
        "avgpool3x3": lambda g, t: g.node(
            "AveragePool", [t], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1], count_include_pad=0
        ),
        "avgpool2x2": lambda g, t: g.node("AveragePool", [t], kernel_shape=[2, 2], strides=[2, 2]),
        "gap": lambda g, t: g.node("GlobalAveragePool", [t]),
        "maxpool": lambda g, t: g.node(
            "MaxPool", [t], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]
        ),
        "nearest2x": lambda g, t: g.node(
            "Resize", [t, "", g.const(np.array([1, 1, 2, 2], np.float32))], mode="nearest"
        ),
        "linear2x": lambda g, t: g.node(
            "Resize", [t, "", g.const(np.array([1, 1, 2, 2], np.float32))], mode="linear"
        ),
        "relu6": lambda g, t: g.node("Clip", [t, g.const(np.float32(0)), g.const(np.float32(0.3))]),
        "relu": lambda g, t: g.node("Relu", [t]),
        "flatten_transpose": lambda g, t: g.node("Transpose", [g.node("Flatten", [t])], perm=[1, 0]),
        "slice_pad": lambda g, t: g.node(
            "Pad",
            [
                g.node("Slice", [t, g.const([1, 2]), g.const([8, 7]), g.const([2, 3]), g.const([2, 2])]),
                g.const(np.array([0, 0, 1, 0, 0, 0, 0, 2])),
            ],
        ),
    }
    for name, make in cases.items():
        g = G()
        t = g.q("x", 1 / 32)
        m = g.model(g.q(make(g, t), 1 / 8), list(x.shape))
        got = run(m, x, rounding="half_even")[0]
        assert np.array_equal(got, ort(m, x)), name
    # the 3x3 average over 9 (or 4, 6 at the border) values is divided exactly, then rounded once
    g = G()
    t = g.q("x", 1.0)
    m = g.model(g.q(g.node("AveragePool", [t], kernel_shape=[3], strides=[3]), 1.0), [1, 1, 3])
    assert run(m, np.array([[[1, 1, 2]]], np.float32), rounding="half_up")[0].item() == 1  # 4/3
    assert run(m, np.array([[[1, 2, 2]]], np.float32), rounding="half_up")[0].item() == 2  # 5/3


def test_linear_resize_floors_under_tidl_rounding():
    g = G()
    t = g.q("x", 1.0)
    out = g.q(g.node("Resize", [t, "", g.const(np.array([1, 1, 1, 2], np.float32))], mode="linear"), 1.0)
    m = g.model(out, [1, 1, 1, 2])
    x = np.array([[[[0.0, 1.0]]]], np.float32)  # half-pixel x2: 0, 0.25, 0.75, 1
    assert run(m, x, rounding="half_even")[0].ravel().tolist() == [0, 0, 1, 1]
    assert run(m, x, rounding="tidl")[0].ravel().tolist() == [0, 0, 0, 1]  # TIDL's integer bilinear: floor
    assert np.array_equal(run(m, x, rounding="half_even")[0], ort(m, x))


def test_gemm_per_channel_depthwise_and_grouped_conv():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 4, 6, 6)).astype(np.float32)
    for groups, per_channel in ((1, True), (2, False), (4, True)):
        g = G()
        t = g.q("x", 1 / 16, np.uint8 if groups == 2 else np.int8)
        codes = rng.integers(-128, 128, size=(4, 4 // groups, 3, 3))
        scale = 2.0 ** -rng.integers(5, 9, size=4) if per_channel else 2.0**-6
        w = g.weight(codes, scale, axis=0 if per_channel else None)
        b = g.weight(
            rng.integers(-5000, 5000, size=4),
            np.asarray(scale) / 16,
            axis=0 if per_channel else None,
            dtype=np.int32,
        )
        y = g.node("Conv", [t, w, b], group=groups, pads=[1, 1, 1, 1], strides=[2, 1], dilations=[1, 2])
        m = g.model(g.q(y, 1 / 4), list(x.shape))
        assert np.array_equal(run(m, x, rounding="half_even")[0], ort(m, x)), (groups, per_channel)
    g = G()
    t = g.node("Flatten", [g.q("x", 1 / 16)])
    w = g.weight(rng.integers(-128, 128, size=(5, 144)), 2.0 ** -rng.integers(5, 9, size=5), axis=0)
    y = g.node(
        "Gemm",
        [t, w, g.weight(rng.integers(-99, 99, size=5), 2.0**-12 * np.ones(5), axis=0, dtype=np.int32)],
        transB=1,
    )
    m = g.model(g.q(y, 1 / 8), list(x.shape))
    assert np.array_equal(run(m, x, rounding="half_even")[0], ort(m, x))


def test_argmax_output_and_clear_errors():
    g = G()
    t = g.q("x", 1 / 16)
    m = g.model(g.node("ArgMax", [t], axis=1, keepdims=0), [1, 3, 2], out_type=TensorProto.INT64)
    x = np.array([[[0.1, 0.9], [0.5, 0.2], [0.3, 0.95]]], np.float32)
    idx = run(m, x)[0]
    assert idx.dtype == np.int64 and idx.tolist() == [[1, 2]] == ort(m, x).tolist()
    g = G()
    m = g.model(g.node("Softplus", [g.q("x", 0.25)]), [1, 3])
    with pytest.raises(IntegerReferenceError, match=r"Softplus_.*no integer implementation of Softplus"):
        run(m, np.zeros((1, 3), np.float32))
    g = G()
    m = g.model(g.q("x", 0.3), [1, 3])
    with pytest.raises(IntegerReferenceError, match="not a power of 2"):
        run(m, np.zeros((1, 3), np.float32))
    g = G()
    m = g.model(g.q(g.node("Relu", ["x"]), 0.25), [1, 3])
    with pytest.raises(IntegerReferenceError, match="float tensor that no QuantizeLinear quantizes"):
        run(m, np.zeros((1, 3), np.float32))


# ------------------------------------------------------------------------------- the simulation
def test_pact2_rounds_half_even_by_default_and_like_tidl_when_asked():
    assert (
        xnnq.layers.PACT2(signed=True, clip_range=4.0).eval()(torch.tensor([2.5, -2.5]) / 32) * 32
    ).tolist() == [2, -2]
    p = xnnq.layers.PACT2(signed=True, clip_range=4.0, rounding="tidl").eval()  # scale 4/128 = 1/32
    x = torch.tensor([2.5, 1.5, -1.5, -2.5]) / 32
    assert (p(x) * 32).tolist() == [3, 2, -1, -2]  # half up (TIDL's requantization)
    p.site = Site.INPUT
    assert (p(x) * 32).tolist() == [3, 2, -2, -3]  # half away (TIDL's input conversion)
    assert xnnq.layers.set_rounding(nn.Sequential(p), "half_even") == 1
    assert (p(x) * 32).tolist() == [2, 2, -2, -2]  # onnxruntime's
    q = xnnq.QuantTestModule(resnet20(), torch.randn(1, 3, 32, 32))
    sites = {n: m.site for n, m in q.quantizers().items()}
    assert sites["input_q"] is Site.INPUT and sum(s is Site.REQUANT for s in sites.values()) == len(sites) - 1
    assert {m.rounding for m in q.quantizers().values()} == {Rounding.HALF_EVEN}
    q = xnnq.QuantTestModule(resnet20(), torch.randn(1, 3, 32, 32), rounding="tidl")  # a wrapper setting
    assert {m.rounding for m in q.quantizers().values()} == {Rounding.TIDL}
    with pytest.raises(ValueError, match="rounding must be one of"):
        xnnq.QuantTestModule(resnet20(), torch.randn(1, 3, 32, 32), rounding="nearest")


# ------------------------------------------------------------------------------------- exports
class TinySeg(nn.Module):
    """FPN-like: stride-2 and depthwise convs, max pool, x2 nearest and linear upsampling with Add and
    Concat of different scales, a 1x1 head and ArgMax over the classes."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, groups=8), nn.BatchNorm2d(8), nn.ReLU6())
        self.c2 = nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.lat = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        a = self.dw(self.c1(x))  # 1/2
        b = self.c2(a)  # 1/4
        c = self.pool(b)  # 1/8
        up = torch.nn.functional.interpolate(c, scale_factor=2.0, mode="nearest") + self.lat(b)
        up = torch.nn.functional.interpolate(up, scale_factor=2.0, mode="bilinear", align_corners=False)
        y = self.head(torch.cat([up, a], dim=1))
        return y


def observed(q, shape, passes=2):
    torch.manual_seed(0)
    q.train()
    xnnq.utils.freeze_bn(q)
    with torch.no_grad():
        for _ in range(passes):
            q(torch.randn(4, *shape[1:]))
    return q.eval()


@pytest.fixture(scope="module")
def tiny_seg(tmp_path_factory):
    torch.manual_seed(0)
    shape = (1, 3, 16, 16)
    q = observed(xnnq.QuantTrainModule(TinySeg().eval(), torch.randn(shape), rounding="tidl"), shape)
    path = tmp_path_factory.mktemp("seg") / "seg_qdq.onnx"
    xnnq.export_onnx(q, torch.randn(shape), path, format="qdq")
    return q, path


def test_tiny_segmenter_three_way(tiny_seg, tmp_path):
    q, path = tiny_seg
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"Resize", "Concat", "Add", "MaxPool"} <= ops
    x = torch.randn(6, 3, 16, 16)
    ref_even = run(path, x, rounding="half_even")[0]
    assert np.array_equal(ref_even, OnnxRunner(path)(x).numpy())  # onnxruntime, bit for bit
    with torch.no_grad():
        assert np.array_equal(
            run(path, x, rounding="tidl")[0], q(x).numpy()
        )  # the simulation (TIDL's rounding)
    r = onnx_check(path, q, [x])
    assert r.rounding == "tidl" and r.ref_frac_exact_vs_sim == 1.0
    # the class map (ArgMax over the logits) of the integer reference, from a graph with ArgMax at the end
    model = onnx.load(str(path))
    logits = model.graph.output[0].name
    am = helper.make_node("ArgMax", [logits], ["classes"], axis=1, keepdims=0)
    model.graph.node.append(am)
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("classes", TensorProto.INT64, None))
    classes = run(model, x, rounding="half_even")[0]
    assert classes.dtype == np.int64 and np.array_equal(classes, ref_even.argmax(1))


def test_first_divergence_names_a_tensor(tiny_seg):
    q, path = tiny_seg
    x = torch.randn(4, 3, 16, 16)
    r = onnx_check(path, q, [x])  # simulation and reference round like TIDL, onnxruntime half to even
    assert r.ref_frac_exact_vs_sim == 1.0
    if r.ref_frac_exact_vs_ort < 1.0:
        div = r.first_divergence
        assert set(div) == {"sim-ort", "ort-ref"} and div["sim-ort"]["tensor"] == div["ort-ref"]["tensor"]
        assert div["ort-ref"]["max_lsb"] >= 1
    xnnq.layers.set_rounding(q, "half_even")
    try:
        r = onnx_check(path, q, [x])
    finally:
        xnnq.layers.set_rounding(q, "tidl")
    assert r.max_abs_diff == 0.0 and r.ref_frac_exact_vs_ort == r.ref_frac_exact_vs_sim == 1.0
    assert r.first_divergence is None


def test_resnet20_reference_matches_onnxruntime_and_simulation(tmp_path):
    torch.manual_seed(0)
    q = observed(xnnq.QuantTrainModule(resnet20(), torch.randn(1, 3, 32, 32)), (1, 3, 32, 32), passes=3)
    path = tmp_path / "r20_qdq.onnx"
    xnnq.export_onnx(q, torch.randn(1, 3, 32, 32), path, format="qdq")
    x = torch.randn(8, 3, 32, 32)
    assert np.array_equal(run(path, x, rounding="half_even")[0], OnnxRunner(path)(x).numpy())
    with torch.no_grad():
        assert np.array_equal(run(path, x, rounding="half_even")[0], q(x).numpy())  # the simulation's default
        xnnq.layers.set_rounding(q, "tidl")
        assert np.array_equal(run(path, x)[0], q(x).numpy())  # the reference's default: TIDL's rounding


# ----------------------------------------------------------------------------------------- traces
def test_traces_layout_and_compare(tiny_seg, tmp_path):
    _, path = tiny_seg
    x = torch.randn(2, 3, 16, 16)
    a, b = tmp_path / "a", tmp_path / "b"
    run(path, x, dump_dir=a)
    run(path, x, dump_dir=b)
    ref = IntegerReference(path)
    files = read_folder(a)
    assert len(files) == len(ref.points) and len(read_folder(a, "_float.bin")) == len(ref.points)
    info = read_layer_info(a / "layer_info.txt")
    assert list(info) == [p.tensor for p in ref.points]
    first = files[0].path.name  # the network input: int8 codes, batch 2, 3 channels, 16x16
    assert first == "tidl_trace_subgraph_0_0000_0002_0001_00001_00003_00016x00016.y"
    assert files[0].path.stat().st_size == 2 * 3 * 16 * 16
    diffs = compare_traces(a, b)
    assert len(diffs) == len(ref.points) and first_mismatch(diffs) is None
    # change one code of the third layer in b: that layer is the first mismatch
    victim = read_folder(b)[2].path
    raw = np.fromfile(victim, dtype=np.uint8)
    raw[5] ^= 1
    raw.tofile(victim)
    bad = first_mismatch(compare_traces(a, b))
    assert bad is not None and bad.data_id_a == 2 and bad.mismatches == 1 and bad.max_abs_diff == 1


@pytest.mark.parametrize("name", ["segmenter", "detector"])
def test_mosaic_task_models_three_way(name, tmp_path):
    """The task models (random weights): the segmenter exported with ArgMax at the end (the class map),
    the SSD detector's six head outputs; half to even: reference == onnxruntime; TIDL's rule: reference ==
    simulation."""
    from xnnq.models.segmenter import mosaic_segmenter
    from xnnq.models.zoo import get_model

    torch.manual_seed(0)
    model = (mosaic_segmenter() if name == "segmenter" else get_model("mosaic_detector")).eval()
    shape = (1, 3, 64, 64)
    q = observed(xnnq.QuantTrainModule(model, torch.randn(shape), rounding="tidl"), shape)
    kw = {"argmax": True} if name == "segmenter" else {}
    path = xnnq.export_onnx(q, torch.randn(shape), tmp_path / f"{name}.onnx", format="qdq", **kw).path
    x = torch.randn(2, *shape[1:])
    sess = ort_session(path)
    names = [o.name for o in sess.get_outputs()]
    ort_out = [
        np.concatenate(v) for v in zip(*[sess.run(None, {"input": x[i : i + 1].numpy()}) for i in range(2)])
    ]
    for a, b in zip(run(path, x, rounding="half_even"), ort_out, strict=True):
        assert np.array_equal(a, b), names
    with torch.no_grad():
        sim = q(x)
    sims = [sim] if isinstance(sim, torch.Tensor) else list(sim)
    for a, s in zip(run(path, x), sims, strict=True):
        s = s.argmax(1, keepdim=True) if a.dtype == np.int64 else s  # the segmenter's class map
        assert np.array_equal(a, s.numpy()), names
