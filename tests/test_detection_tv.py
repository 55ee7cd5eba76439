"""torchvision detector cores (random weights, no download) through QAT, export with the TIDL prototxt and
onnxruntime; a conv shared across call sites (RetinaNet's head towers) keeps its weights shared."""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

import xnnq
from xnnq.export.check import ort_session
from xnnq.export.emulate import tidl_emulation
from xnnq.tasks import detection
from xnnq.tasks.meta_arch import head_conv, parse_prototxt, read_prototxt
from xnnq.tasks.tv_detection import torchvision_core


def qat_export_check(core, meta, size: int, tmp_path, formats=("qdq", "tidl")):
    """2 QAT steps, export each format, prototxt names = graph outputs from convs, onnxruntime == PyTorch."""
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
            assert torch.equal(torch.from_numpy(g), r), fmt  # bit-exact: same grid, same rounding


def test_ssdlite320_core(tmp_path):
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    model = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=4).eval()
    with pytest.warns(UserWarning, match="clamps"):
        core, meta = torchvision_core(model, 128)
    assert meta.num_classes == 4 and len(meta.priors) == 6 and meta.meta_arch_type == 3
    qat_export_check(core, meta, 128, tmp_path)


@pytest.mark.slow
@pytest.mark.xfail(
    reason="open: the QDQ export of the RetinaNet core is not bit-exact with the simulation on some outputs "
    "(the SSD core and the shared-conv case are)",
    strict=False,
)
def test_retinanet_resnet50_fpn_core(tmp_path):
    from torchvision.models.detection import retinanet_resnet50_fpn

    model = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3).eval()
    core, meta = torchvision_core(model, 64)
    assert meta.meta_arch_type == 5 and meta.octave_base_scale == 4.0 and meta.scales_per_octave == 3
    qat_export_check(core, meta, 64, tmp_path, formats=("qdq",))


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
