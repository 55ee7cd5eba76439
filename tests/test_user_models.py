"""Detector-shaped models written for the test, as users bring them: wrapped as they are, trained a few steps,
exported for a chip, and the QDQ file run in onnxruntime against the simulation."""

from __future__ import annotations

import warnings
from collections import Counter

import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import xnnq
from xnnq.export import export_onnx
from xnnq.export.check import onnx_check
from xnnq.layers import freeze_quant_range
from xnnq.utils import freeze_bn


def _conv(i: int, o: int, k: int = 1, s: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(i, o, k, s, k // 2, bias=False), nn.BatchNorm2d(o), nn.SiLU(inplace=True))


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool = True):
        super().__init__()
        self.a, self.b, self.shortcut = _conv(c, c, 1), _conv(c, c, 3), shortcut

    def forward(self, x):
        return x + self.b(self.a(x)) if self.shortcut else self.b(self.a(x))


class C2f(nn.Module):
    """YOLOv8's block: the first conv's output chunked and iterated, bottlenecks appended, all concatenated."""

    def __init__(self, i: int, o: int, n: int = 1, shortcut: bool = True):
        super().__init__()
        self.c = o // 2
        self.cv1, self.cv2 = _conv(i, 2 * self.c), _conv((2 + n) * self.c, o)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, i: int, o: int, k: int = 5):
        super().__init__()
        self.cv1, self.cv2, self.m = _conv(i, i // 2), _conv(i * 2, o), nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class TinyYolo(nn.Module):
    """Backbone of C2f blocks, SPPF, a PAN neck (nearest upsampling, concatenation), decoupled heads."""

    def __init__(self, classes: int = 10, sppf_kernel: int = 5):
        super().__init__()
        self.stem = nn.Sequential(_conv(3, 16, 3, 2), _conv(16, 32, 3, 2), C2f(32, 32), _conv(32, 64, 3, 2))
        self.p3 = C2f(64, 64, 2)
        self.p4 = nn.Sequential(_conv(64, 128, 3, 2), C2f(128, 128), SPPF(128, 128, sppf_kernel))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.n3, self.down, self.n4 = (
            C2f(192, 64, shortcut=False),
            _conv(64, 64, 3, 2),
            C2f(192, 128, shortcut=False),
        )
        self.box = nn.ModuleList(nn.Sequential(_conv(c, 32, 3), nn.Conv2d(32, 64, 1)) for c in (64, 128))
        self.cls = nn.ModuleList(nn.Sequential(_conv(c, 32, 3), nn.Conv2d(32, classes, 1)) for c in (64, 128))

    def forward(self, x):
        p3 = self.p3(self.stem(x))
        p4 = self.p4(p3)
        n3 = self.n3(torch.cat([self.up(p4), p3], 1))
        n4 = self.n4(torch.cat([self.down(n3), p4], 1))
        return tuple(torch.cat([b(f), c(f)], 1) for f, b, c in zip((n3, n4), self.box, self.cls))


@pytest.mark.parametrize("sppf_kernel", [5, 3])
def test_a_yolov8_shaped_detector_for_tda4vm(tmp_path, sppf_kernel):
    torch.manual_seed(0)
    model = TinyYolo(sppf_kernel=sppf_kernel).eval()
    x = torch.randn(1, 3, 64, 64)
    q = xnnq.QuantTrainModule(model, x, target="TDA4VM", silu="sigmoid_mul").train()
    # every SiLU as TIDL runs it (sigma(x) quantized), every C2f chunk traced
    silus = sum(isinstance(m, nn.SiLU) for m in model.modules())
    assert sum(a.reason == "Sigmoid" for a in q.plan.acts) == silus > 0
    opt = torch.optim.SGD(q.parameters(), lr=1e-3, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        sum(o.pow(2).mean() for o in q(torch.randn(4, 3, 64, 64))).backward()
        opt.step()
    freeze_bn(q)
    freeze_quant_range(q)
    q.eval()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        res = export_onnx(q, x, tmp_path / "yolo.onnx", format="qdq", target="TDA4VM")
    rules = Counter(v.rule for v in res.violations)
    # SPPF's 5x5 stride-1 max pooling is outside the kernels TI validated (warned); 3x3 is clean
    assert rules == (Counter({"Pool.validated_sizes": 3}) if sppf_kernel == 5 else Counter()), rules
    model_onnx = onnx.load(str(res.path))
    assert not {"Softplus", "Erf"} & {n.op_type for n in model_onnx.graph.node}
    b = torch.randn(1, 3, 64, 64)  # the export's static batch
    assert onnx_check(res.path, lambda t: q(t)[0], [b]).max_lsb_diff == 0.0
    sess = ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        sim = q(b)
    ort_outs = sess.run(None, {sess.get_inputs()[0].name: b.numpy()})
    assert len(ort_outs) == len(sim) == 2
    for o, s in zip(ort_outs, sim):  # both heads, bit for bit
        assert torch.equal(torch.from_numpy(o), s)
