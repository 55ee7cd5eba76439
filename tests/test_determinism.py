"""Determinism: the same seed gives the same ranges, weights and accuracy (CPU).

In one process, in a fresh process, and on the real model and data (ResNet-20 / CIFAR-10, when the shared
data is present).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import xnnq
from xnnq.utils import freeze_bn

from conftest import quantizer_ranges, tiny_convnet

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """1 intra-op thread (2 shared cores: more threads only contend); also what the fresh process uses."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def synthetic(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """3 classes told apart by the mean of one colour channel."""
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 3, 8, 8, generator=g)
    x[torch.arange(n), y] += 1.5
    return x, y


def qat_run(seed: int, steps: int = 12) -> dict:
    """Seeded QAT: model init, data, shuffling, dropout all drawn from ``seed``."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    q = xnnq.QuantTrainModule(tiny_convnet(num_classes=3, dropout=0.2), torch.randn(1, 3, 8, 8))
    q.train()
    x, y = synthetic(256, g)
    xt, yt = synthetic(128, g)
    params = list(q.parameters())
    momentum = [torch.zeros_like(p) for p in params]
    for i in range(steps):
        if i == steps // 2:
            freeze_bn(q)
        idx = torch.randperm(256, generator=g)[:32]
        q.zero_grad()
        F.cross_entropy(q(x[idx]), y[idx]).backward()
        with torch.no_grad():  # SGD with momentum by hand: torch.optim's first use imports torch._dynamo
            for p, m in zip(params, momentum):  # (~10 s in the fresh process on a loaded machine)
                m.mul_(0.9).add_(p.grad)
                p.add_(m, alpha=-0.05)
    q.eval()
    with torch.no_grad():
        acc = (q(xt).argmax(1) == yt).float().mean().item() * 100
    ranges = {n: (lo.item(), hi.item()) for n, (lo, hi) in quantizer_ranges(q).items()}
    return {
        "ranges": ranges,
        "acc": acc,
        "state": {k: v for k, v in q.state_dict().items() if isinstance(v, torch.Tensor)},
    }


def digest(run: dict) -> str:
    h = hashlib.sha256(repr((sorted(run["ranges"].items()), run["acc"])).encode())
    for k, v in sorted(run["state"].items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_same_seed_same_ranges_weights_and_accuracy():
    a, b = qat_run(0), qat_run(0)
    assert a["ranges"] == b["ranges"]
    assert a["acc"] == b["acc"]
    for k, v in a["state"].items():
        assert torch.equal(v, b["state"][k]), k
    c = qat_run(1)  # and the seed matters (the check above is not vacuous)
    assert c["ranges"] != a["ranges"]


@pytest.mark.slow
def test_same_seed_in_a_fresh_process():
    """No hidden state (thread count aside, fixed to 1 in both): a new interpreter gives the same digest."""
    here = digest(qat_run(0))
    code = (
        "import sys, torch; torch.set_num_threads(1); sys.path.insert(0, 'tests'); "
        "import test_determinism as t; print(t.digest(t.qat_run(0)))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == here


@pytest.mark.data
def test_resnet20_cifar10_calibration_is_deterministic():
    from xnnq.data import batches, cifar10, data_root, evaluate
    from xnnq.models.cifar_resnet import resnet20_cifar10

    x_tr, y_tr = cifar10("train", limit=256)
    x_te, y_te = cifar10("test", limit=200)

    def run() -> tuple[dict, float]:
        torch.manual_seed(0)
        m = resnet20_cifar10(data_root() / "weights" / "resnet20_cifar10jpg.pt")
        q = xnnq.QuantTrainModule(m, torch.randn(1, 3, 32, 32))
        q.train()
        freeze_bn(q)
        with torch.no_grad():
            for xb, _ in batches(
                x_tr, y_tr, 128, shuffle=True, train_augment=True, generator=torch.Generator().manual_seed(0)
            ):
                q(xb)
        q.eval()
        return (
            {n: (lo.item(), hi.item()) for n, (lo, hi) in quantizer_ranges(q).items()},
            evaluate(q, x_te, y_te),
        )

    (r1, acc1), (r2, acc2) = run(), run()
    assert r1 == r2
    assert acc1 == acc2
    assert acc1 > 60.0  # a sane quantized model, not two identical failures
