"""Structural tests on torchvision's segmentation models (random weights, 64x64 inputs): wrap, two QAT
steps, export both formats (the tidl one with the ArgMax head), onnxruntime agreement with the simulation."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn
from torchvision.models import segmentation as tvseg

import xnnq
from xnnq.export.check import OnnxRunner, onnx_check
from xnnq.export.emulate import tidl_emulation

MODELS = [
    "lraspp_mobilenet_v3_large",
    "deeplabv3_mobilenet_v3_large",
    pytest.param("fcn_resnet50", marks=pytest.mark.slow),  # 33 M parameters: each export takes about a minute
]
CLASSES = 5


@pytest.mark.parametrize("name", MODELS)
def test_torchvision_segmentation_qat_and_export(name, tmp_path):
    torch.manual_seed(0)
    model = getattr(tvseg, name)(weights=None, weights_backbone=None, num_classes=CLASSES).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 64, 64)
    target = torch.randint(0, CLASSES, (2, 64, 64))

    q = xnnq.QuantTrainModule(model, x[:1])
    opt = torch.optim.SGD(q.parameters(), lr=1e-3, momentum=0.9)
    q.train()
    w0 = next(p for n, p in q.named_parameters() if n.endswith("weight")).detach().clone()
    losses = []
    for _ in range(2):
        loss = nn.functional.cross_entropy(q(x)["out"], target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert all(np.isfinite(losses))
    assert not torch.equal(w0, next(p for n, p in q.named_parameters() if n.endswith("weight")))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the user's model untouched
    q.eval()
    with torch.no_grad():
        sim = q(x)["out"]
    assert sim.shape == (2, CLASSES, 64, 64)

    # QDQ: onnxruntime computes the simulation's logits (within one output LSB)
    qdq = xnnq.export_onnx(q, x[:1], tmp_path / f"{name}_qdq.onnx", format="qdq")
    assert [o.name for o in qdq.model.graph.output] == ["out"]
    r = onnx_check(qdq.path, q, [x])
    assert r.lsb is not None and r.max_lsb_diff <= 1.0 and r.frac_within_1_lsb >= 0.999, r

    # tidl + ArgMax: the float graph ends in ArgMax on "out"; TIDL's quantization of it (emulated) gives the
    # simulation's index map
    tidl = xnnq.export_onnx(q, x[:1], tmp_path / f"{name}_tidl.onnx", format="tidl", argmax=True)
    graph = tidl.model.graph
    assert graph.node[-1].op_type == "ArgMax" and graph.output[0].name == "out"
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    idx = OnnxRunner(tidl_emulation(tidl.path))(x)
    assert idx.shape == (2, 1, 64, 64)
    agree = (idx == sim.argmax(1, keepdim=True)).float().mean()
    assert agree >= 0.99, f"{name}: emulated ArgMax agrees with the simulation on {agree:.4f} of the pixels"
