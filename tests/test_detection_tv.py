"""torchvision detector cores (random weights, no download) through QAT, export with the TIDL prototxt and
onnxruntime; a conv shared across call sites (RetinaNet's head towers) keeps its weights shared; a large
bias on a fine accumulator grid (RetinaNet's class prior) leaves the products room in int32."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import xnnq
from xnnq.export import reference
from xnnq.export.check import ort_session
from xnnq.export.emulate import tidl_emulation
from xnnq.tasks import detection
from xnnq.tasks.meta_arch import head_conv, parse_prototxt, read_prototxt
from xnnq.tasks.tv_detection import torchvision_core


def qat_export_check(core, meta, size: int, tmp_path, formats=("qdq", "tidl"), exact: bool = True):
    """2 QAT steps, export each format, prototxt names = graph outputs from convs, onnxruntime == PyTorch
    (``exact``; else the caller compares). Returns (input batch, simulated outputs, {format: (path, outputs)})."""
    torch.set_num_threads(1)
    x = torch.randn(2, 3, size, size)
    q = xnnq.QuantTrainModule(core, x[:1]).train()
    opt = torch.optim.SGD(q.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in q.state_dict().items() if k.endswith(".weight")}
    for _ in range(2):
        loss = sum(o.pow(2).mean() for o in q(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
    changed = sum(not torch.equal(before[k], v) for k, v in q.state_dict().items() if k in before)
    assert changed > 0.9 * len(before)  # the QAT steps trained (almost) every weight
    q.eval()
    xnnq.layers.set_rounding(q, "half_even")  # onnxruntime's rounding, for bit-exact comparisons
    with torch.no_grad():
        ref = q(x[:1])
    runs = {}
    for fmt in formats:
        path = detection.export(q, tmp_path / f"core_{fmt}.onnx", format=fmt, meta_arch=meta)
        graph = onnx.load(str(path)).graph
        outs = [o.name for o in graph.output]
        block = next(
            iter(
                v for k, v in parse_prototxt(path.with_suffix(".prototxt").read_text()).items() if k != "name"
            )
        )[0]
        assert block["box_input"] == [outs[i] for i in meta.box_outputs]
        assert block["class_input"] == [outs[i] for i in meta.class_outputs]
        assert all(head_conv(graph, n).op_type == "Conv" for n in block["box_input"] + block["class_input"])
        assert read_prototxt(path.with_suffix(".prototxt")) == meta
        session = ort_session(tidl_emulation(path) if fmt == "tidl" else path)
        got = session.run(None, {"input": x[:1].numpy()})
        assert len(got) == len(ref)
        for g, r in zip(got, ref):
            if exact:
                assert torch.equal(torch.from_numpy(g), r), fmt  # bit-exact: same grid, same rounding
        runs[fmt] = (path, got)
    return x, ref, runs


def accumulator_bounds(path) -> dict[str, np.ndarray]:
    """Per Conv of a QDQ file with 8-bit operands, per output channel: the largest |accumulator| any input
    on the grid can give, |bias code| + max|x code| · Σ|w code| (from the file alone)."""
    graph = onnx.load(str(path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    prod = {o: n for n in graph.node for o in n.output}
    out = {}
    for n in graph.node:
        if n.op_type != "Conv" or len(n.input) < 3:
            continue
        dq_x, dq_w, dq_b = (prod[i] for i in n.input[:3])
        x_type, w = inits[dq_x.input[2]].dtype, inits[dq_w.input[0]]
        if x_type.itemsize != 1 or w.dtype.itemsize != 1:
            continue
        x_max = 255 if x_type == np.uint8 else 128
        w_sum = np.abs(w.astype(np.int64)).reshape(len(w), -1).sum(1)
        out[n.name] = np.abs(inits[dq_b.input[0]].astype(np.int64)) + x_max * w_sum
    return out


def assert_within_float32_bound(path, got, sim, what: str) -> None:
    """``got`` == ``sim`` bit for bit on every output channel whose conv's accumulator stays below 2^24 (float32
    holds it exactly); within 1 LSB beyond (the simulation and onnxruntime round the accumulator to float32
    before requantizing, the integer reference does not: a near-tie can round either way)."""
    graph = onnx.load(str(path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    prod = {o: n for n in graph.node for o in n.output}
    bounds = accumulator_bounds(path)
    for k, (g, r) in enumerate(zip(got, sim)):
        dq = prod[graph.output[k].name]
        conv = prod[prod[dq.input[0]].input[0]]
        lsb = float(inits[dq.input[1]])
        d = np.abs(np.asarray(g, np.float64) - r.numpy().astype(np.float64)) / lsb
        loose = (bounds[conv.name] > 2**24).reshape(1, -1, 1, 1) if conv.name in bounds else False
        assert d.max() <= 1 and not (d * ~loose).any(), (what, graph.output[k].name, float(d.max()))


def test_ssdlite320_core(tmp_path):
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    model = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=4).eval()
    with pytest.warns(UserWarning, match="clamps"):
        core, meta = torchvision_core(model, 128)
    assert meta.num_classes == 4 and len(meta.priors) == 6 and meta.meta_arch_type == 3
    qat_export_check(core, meta, 128, tmp_path)


@pytest.mark.slow
def test_retinanet_resnet50_fpn_core(tmp_path):
    """Random weights at 64 px: P6/P7 are 1x1, so their head towers (a 3x3 conv sees only its centre tap)
    shrink std-0.01 activations to a scale of 2^-18; the class conv's prior bias -log(99) = -4.6 on the
    accumulator grid 2^-18 · 2^-11 is -2.5e9, beyond int32. Saturated at int32 (as xnnq used to), bias +
    a negative sum of products wrapped around in onnxruntime's fused QLinearConv (int32 accumulator), +4 for
    -4 (128 LSB); the integer reference (int64) and the simulation agreed. Now the bias saturates where
    no input can take the accumulator out of int32."""
    from torchvision.models.detection import retinanet_resnet50_fpn

    model = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3).eval()
    core, meta = torchvision_core(model, 64)
    assert meta.meta_arch_type == 5 and meta.octave_base_scale == 4.0 and meta.scales_per_octave == 3
    x, sim, runs = qat_export_check(core, meta, 64, tmp_path, formats=("qdq",), exact=False)
    path, ort = runs["qdq"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ints = reference.run(path, x[:1], rounding="half_even")
    assert_within_float32_bound(path, ort, sim, "onnxruntime")  # int32 wrap-around: 128 LSB
    assert_within_float32_bound(path, ints, sim, "integer reference")
    assert not [w for w in caught if "int32" in str(w.message)]  # no accumulator leaves int32
    bounds = {name: int(b.max()) for name, b in accumulator_bounds(path).items()}
    near = sorted(name for name, b in bounds.items() if b > 2**30)
    assert near and all(name.startswith("/cls_") for name in near), near  # the case is here: class convs
    assert max(bounds.values()) <= 2**31 - 1  # and bias + products can no longer leave int32


def test_prior_bias_on_a_fine_grid_keeps_the_accumulator_in_int32(tmp_path):
    """The RetinaNet case in small: a -4.6 bias after a near-zero activation (grid 2^-24 · 2^-10). onnxruntime
    (fused QLinearConv, int32), the integer reference (int64) and the simulation agree bit for bit."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    with torch.no_grad():
        model[0].weight.mul_(1e-5)
        model[0].bias.zero_()
        model[2].bias.fill_(-4.6)
    x = torch.randn(4, 3, 8, 8)
    q = xnnq.QuantTrainModule(model, x[:1]).train()
    for _ in range(2):
        q(x)
    q.eval()
    xnnq.layers.set_rounding(q, "half_even")
    with torch.no_grad():
        sim = q(x)
    path = xnnq.export_onnx(q, x[:1], tmp_path / "prior.onnx", format="qdq").path
    (bound,) = [b for name, b in accumulator_bounds(path).items() if name.startswith("/2")]
    assert (bound > 2**30).all() and (bound <= 2**31 - 1).all()  # the bias saturated, with room left
    session = ort_session(path)
    got = np.concatenate([session.run(None, {"input": x[i : i + 1].numpy()})[0] for i in range(len(x))])
    assert np.array_equal(got, sim.numpy())
    assert np.array_equal(reference.run(path, x, rounding="half_even")[0], sim.numpy())


class SharedHead(nn.Module):
    """One head conv applied to two feature levels (as RetinaNet / FCOS heads are)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU())
        self.head = nn.Conv2d(8, 4, 3, 1, 1)

    def forward(self, x):
        a = self.stem(x)
        b = self.down(a) * 64.0
        return self.head(a), self.head(b)


def test_shared_conv_keeps_one_weight_and_quantizes_each_call(tmp_path):
    model = SharedHead()
    x = torch.randn(4, 3, 16, 16)
    q = xnnq.QuantTrainModule(model, x[:1])
    assert "sharing its parameters" in q.surgery_report()
    heads = [q.module.head, q.module.head_1]
    assert heads[0] is not heads[1] and heads[0].weight is heads[1].weight  # one parameter, two call sites
    opt = torch.optim.SGD(q.parameters(), lr=0.1)
    for _ in range(2):
        loss = sum(o.pow(2).mean() for o in q(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert heads[0].weight is heads[1].weight and not torch.equal(heads[0].weight, model.head.weight)
    q.eval()
    xnnq.layers.set_rounding(q, "half_even")  # onnxruntime's rounding, for bit-exact comparisons
    scales = [float(q.module.head_q.qparams()[0]), float(q.module.head_1_q.qparams()[0])]
    assert scales[1] > scales[0]  # each call's output has its own range (the second sees a 64x larger input)
    result = xnnq.export_onnx(q, x[:1], tmp_path / "shared.onnx", format="qdq")
    convs = [n for n in result.model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 4
    xnnq.export_onnx(q, x[:1], tmp_path / "shared_tidl.onnx")  # the float graph: one weight per call site
    float_inits = {
        t.name: onnx.numpy_helper.to_array(t)
        for t in onnx.load(str(tmp_path / "shared_tidl.onnx")).graph.initializer
    }
    assert (float_inits["head.weight"] == float_inits["head_1.weight"]).all()
    assert not (
        float_inits["head.bias"] == float_inits["head_1.bias"]
    ).all()  # biases on each call's own grid
    session = ort_session(result.path)
    with torch.no_grad():
        ref = q(x)
    for i in range(len(x)):
        got = session.run(None, {"input": x[i : i + 1].numpy()})
        for g, r in zip(got, ref):
            assert torch.equal(torch.from_numpy(g), r[i : i + 1])
