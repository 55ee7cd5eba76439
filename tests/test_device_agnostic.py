"""Off the CPU (where users train), a QAT step reads nothing back to the host and every tensor follows the model.

There is no GPU here, so the device is ``meta``: the same code path as CUDA (everything that is not CPU takes
the torch-op path), and a tensor there has no data, so any host read (``.item()``, ``.tolist()``, ``float(t)``,
``bool(t)``, an ``if`` on a tensor) raises, and so does an element-wise op mixing a meta tensor with a CPU tensor
that is not a 0-d scalar (a tensor that ``.to(device)`` left behind); the state dict's devices are checked too.
The wrapper takes its first step on the CPU: the first batch decides each activation's sign, one documented
host read per quantizer (``RangeTracker.observed_signed``).
"""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import xnnq
from xnnq.layers import freeze_quant_range
from xnnq.models import zoo
from xnnq.utils import freeze_bn


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched while it is active."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


class ManyOps(nn.Module):
    """Conv/BN/ReLU6, depthwise, a squeeze-excitation product, concat, upsampling, a transposed conv, pooling."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8))
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 8, 1), nn.Hardsigmoid())
        self.down = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        a = self.stem(x)
        b = F.hardswish(self.dw(a))
        b = b * self.se(b)
        c = torch.cat([a, b], 1)
        d = F.relu(self.down(c))
        e = self.up(d) + F.interpolate(d[:, :8], scale_factor=2.0, mode="nearest")
        return self.head(torch.flatten(F.avg_pool2d(e, e.shape[-1]), 1))


def _loss(out) -> torch.Tensor:
    outs = out if isinstance(out, (tuple, list)) else [out]
    return sum(o.float().pow(2).mean() for o in outs)


MODELS = {
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(weights=None), 64),
    "resnet18": (lambda: torchvision.models.resnet18(weights=None), 64),  # max pooling
    "many_ops": (ManyOps, 16),
    "mosaic_detector": (lambda: zoo.get_model("mosaic_detector"), 64),
    "mosaic_segmenter": (lambda: zoo.get_model("mosaic_segmenter"), 64),
}


def _on_meta(name: str, range_learning: str) -> tuple[xnnq.QuantTrainModule, torch.Tensor]:
    """``name`` wrapped, its first step taken on the CPU (each activation's sign: one host read each), then the
    wrapper and an input batch moved to ``meta``."""
    build, size = MODELS[name]
    x = torch.randn(2, 3, size, size)
    q = xnnq.QuantTrainModule(build(), x[:1], range_learning=range_learning).train()
    _loss(q(x)).backward()
    q.zero_grad(set_to_none=True)
    return q.to("meta"), x.to("meta")


@pytest.mark.parametrize("range_learning", ["statistics", "tqt"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_qat_steps_off_the_cpu_make_no_host_read(name, range_learning):
    q, xm = _on_meta(name, range_learning)
    opts = [torch.optim.SGD(q.non_range_parameters(), lr=0.01, momentum=0.9)]
    if q.range_parameters():
        opts.append(torch.optim.Adam(q.range_parameters(), lr=0.01))

    def step():
        for o in opts:
            o.zero_grad(set_to_none=True)
        _loss(q(xm)).backward()
        for o in opts:
            o.step()

    with OpCounter() as seen:
        step()  # ranges tracked (or thresholds initialised), BatchNorm updating
        step()
        freeze_bn(q)
        freeze_quant_range(q)
        step()  # frozen
        q.eval()
        with torch.no_grad():
            out = q(xm)
    # the quantizers and the weight path ran (this is not a float model moved to meta)
    assert seen.ops["aten.round"] + seen.ops["aten.fake_quantize_per_tensor_affine_cachemask"] > 0, seen.ops
    assert seen.ops["aten.exp2"] > 0
    outs = out if isinstance(out, (tuple, list)) else [out]
    assert all(o.device.type == "meta" for o in outs)
    state = q.state_dict()
    assert all(t.device.type == "meta" for t in state.values() if isinstance(t, torch.Tensor)), [
        k for k, t in state.items() if isinstance(t, torch.Tensor) and t.device.type != "meta"
    ]


class Gate(nn.Module):
    """Reads a value back to the host in its forward (kept whole: ``leaf_modules``)."""

    def forward(self, y):
        return y * 2 if float(y.detach().mean()) > -1e9 else y


class ReadsBack(nn.Module):
    """A model with one host read in its forward (what the test above must catch)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.conv(x))


def test_a_host_read_off_the_cpu_is_caught():
    """The detector itself: the same procedure on a model with one host read fails on it."""
    x = torch.randn(2, 3, 8, 8)
    q = xnnq.QuantTrainModule(ReadsBack(), x[:1], leaf_modules=[Gate]).train()
    q(x).sum().backward()
    q.to("meta")
    with pytest.raises((RuntimeError, NotImplementedError), match="meta"):
        q(x.to("meta"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, range_learning",
    [
        ("mobilenet_v2", "statistics"),
        ("resnet18", "statistics"),
        ("mosaic_detector", "tqt"),
        ("many_ops", "tqt"),
    ],
)
def test_the_qat_model_off_the_cpu_compiles_into_one_graph(name, range_learning):
    """After ``freeze_bn``, ``torch.compile`` traces the whole QAT step off the CPU (ranges still tracked or
    thresholds learned) as one graph: no graph break per quantizer, weight path, BatchNorm or residual add,
    so the compiler can fuse their small ops into a few kernels."""
    q, xm = _on_meta(name, range_learning)
    freeze_bn(q)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(q)(xm)
    assert explained.graph_break_count == 0, [str(b.reason).splitlines()[0] for b in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.slow
def test_torch_compile_of_the_torch_op_path_gives_the_eager_step(fused_mode):
    """The torch-op path (what runs off the CPU), compiled with inductor on the CPU after ``freeze_bn``: the
    forward, the range trackers' buffers and the gradients of eager mode."""
    import copy

    fused_mode("0")
    x = torch.randn(4, 3, 16, 16)
    q = xnnq.QuantTrainModule(ManyOps(), x[:1]).train()
    _loss(q(x)).backward()
    freeze_bn(q)
    q.zero_grad(set_to_none=True)
    qc = copy.deepcopy(q)
    torch._dynamo.reset()
    out_e, out_c = q(x), torch.compile(qc)(x)
    torch.testing.assert_close(out_c, out_e, rtol=0, atol=0)
    state_c = qc.state_dict()
    for k, a in q.state_dict().items():
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, state_c[k]), k
    _loss(out_e).backward()
    _loss(out_c).backward()
    for (k, a), b in zip(q.named_parameters(), qc.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6, msg=k)
