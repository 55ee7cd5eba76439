"""Checkpoint / resume of QAT, and a QAT state dict loaded into QuantTestModule.

A checkpoint is ``{"model": qmodel.state_dict(), "optimizer": opt.state_dict()}`` saved with
``torch.save`` and read back with ``torch.load(..., weights_only=True)``. The model state holds every
range (tracker buffers), the quantizers' flags (frozen, observed, quant_enabled, data_signed) and the
wrapper's BN freeze as extra state, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import copy

import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import xnnq
from xnnq.layers import freeze_quant_range, set_quant_enabled
from xnnq.utils import freeze_bn

DUMMY = torch.randn(1, 3, 8, 8)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(y + self.bn2(self.conv2(y)))
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


def net(seed: int) -> Net:
    torch.manual_seed(seed)
    return Net()


def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)


def step(q, opt, i: int) -> torch.Tensor:
    x, y = batch(i)
    opt.zero_grad()
    out = q(x)
    F.cross_entropy(out, y).backward()
    opt.step()
    return out.detach()


def make(q) -> torch.optim.Optimizer:
    return torch.optim.AdamW(q.parameters(), lr=1e-2, weight_decay=1e-3)


def flags(q) -> dict:
    return {n: (p.frozen, p.observed, p.quant_enabled, p.data_signed) for n, p in q.quantizers().items()}


def tensors(sd: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


PROBE = batch(7)[0]


@pytest.fixture(scope="module")
def mid_qat(tmp_path_factory) -> dict:
    """4 QAT steps (BN frozen after step 2, one quantizer frozen after step 3), a checkpoint, then 2 more
    uninterrupted steps: what a resumed run must reproduce."""
    q = xnnq.QuantTrainModule(net(0), DUMMY)
    q.train()
    opt = make(q)
    for i in range(4):
        if i == 2:
            freeze_bn(q)
        if i == 3:
            q.quantizers()[
                "conv2_q" if "conv2_q" in q.quantizers() else next(iter(q.quantizers()))
            ].frozen = True
        step(q, opt, i)
    path = tmp_path_factory.mktemp("ckpt") / "qat.pt"
    torch.save({"model": q.state_dict(), "optimizer": opt.state_dict(), "step": 4}, path)
    at_ckpt = {
        "flags": flags(q),
        "state": {k: v.clone() for k, v in tensors(q.state_dict()).items()},
        "eval_out": copy.deepcopy(q).eval()(PROBE).detach(),
    }
    outs = [step(q, opt, i) for i in (4, 5)]
    q.eval()
    return {
        "path": path,
        "ckpt": at_ckpt,
        "outs": outs,
        "final": tensors(q.state_dict()),
        "final_eval": q(PROBE),
    }


def resume(path) -> tuple[xnnq.QuantTrainModule, torch.optim.Optimizer]:
    ckpt = torch.load(path, weights_only=True)  # no pickled code: tensors, numbers, bools, None, dicts
    q = xnnq.QuantTrainModule(net(1), DUMMY)  # different initial weights: everything must come from the file
    q.train()
    q.load_state_dict(ckpt["model"])
    opt = make(q)
    opt.load_state_dict(ckpt["optimizer"])
    return q, opt


def test_resume_restores_ranges_flags_and_bn_freeze(mid_qat):
    r, _ = resume(mid_qat["path"])
    assert flags(r) == mid_qat["ckpt"]["flags"]
    assert any(f[0] for f in flags(r).values()) and not all(f[0] for f in flags(r).values())
    assert all(f[1] for f in flags(r).values())  # observed: no re-calibration needed
    assert r.bn_frozen and all(not m.training for m in r.modules() if isinstance(m, nn.BatchNorm2d))
    r.train()  # train() keeps BN frozen after a resume
    assert all(not m.training for m in r.modules() if isinstance(m, nn.BatchNorm2d))
    for k, v in mid_qat["ckpt"]["state"].items():
        assert torch.equal(r.state_dict()[k], v), k


def test_resume_gives_bit_identical_next_steps(mid_qat):
    r, ropt = resume(mid_qat["path"])
    for j, i in enumerate((4, 5)):  # the first resumed step, and one more (optimizer moments, EMA counters)
        assert torch.equal(step(r, ropt, i), mid_qat["outs"][j]), f"step {i}"
    for k, v in mid_qat["final"].items():
        assert torch.equal(r.state_dict()[k], v), f"{k} differs after the resumed steps"
    r.eval()
    assert torch.equal(r(PROBE), mid_qat["final_eval"])


def test_qat_state_dict_into_quant_test_module_needs_no_calibration(mid_qat):
    sd = torch.load(mid_qat["path"], weights_only=True)["model"]
    t = xnnq.QuantTestModule(net(2), DUMMY)
    t.load_state_dict(sd)
    x = PROBE
    assert torch.equal(t(x), mid_qat["ckpt"]["eval_out"])  # what the QAT model computed in eval mode
    t.train()  # stays in eval: ranges never move
    before = tensors(t.state_dict())
    t(x * 10)
    assert not t.training
    for k, v in tensors(t.state_dict()).items():
        assert torch.equal(v, before[k]), k


def test_quant_enabled_flag_survives_the_checkpoint(tmp_path):
    q = xnnq.QuantTrainModule(net(0), DUMMY)
    q.train()
    q(batch(0)[0])
    set_quant_enabled(q, False)
    freeze_quant_range(q)
    torch.save(q.state_dict(), tmp_path / "f.pt")
    t = xnnq.QuantTestModule(net(3), DUMMY)
    t.load_state_dict(torch.load(tmp_path / "f.pt", weights_only=True))
    assert all(not p.quant_enabled and p.frozen for p in t.quantizers().values())
    assert all(
        not m.quant_enabled
        for m in t.modules()
        if isinstance(m, (xnnq.layers.QuantConv2d, xnnq.layers.QuantLinear))
    )


@pytest.mark.parametrize("fmt", ["tidl", "qdq"])
def test_qat_state_dict_into_quant_test_module_exports_without_calibration(mid_qat, tmp_path, fmt):
    t = xnnq.QuantTestModule(net(2), DUMMY)
    t.load_state_dict(torch.load(mid_qat["path"], weights_only=True)["model"])
    before = tensors(t.state_dict())
    res = xnnq.export_onnx(
        t, DUMMY, tmp_path / f"m_{fmt}.onnx", format=fmt
    )  # no forward pass was ever run on t
    for k, v in tensors(t.state_dict()).items():
        assert torch.equal(v, before[k]), k
    x = batch(8)[0][:1]
    sess = ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    ref = t(x)
    step_out = float(t.quantizers()["fc_q"].scale()) if "fc_q" in t.quantizers() else 1e-2
    assert (got - ref).abs().max().item() <= step_out * 1.01  # at most one output step apart (float order)
