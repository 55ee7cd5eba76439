import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import xnnq
from xnnq.layers import PACT2, AddBlock, ResizeWith
from xnnq.models.cifar_resnet import resnet20


def call_targets(q):
    return [n.target for n in q.module.graph.nodes if n.op == "call_module"]


def assert_clean(q, float_model):
    gm = q.module
    assert not any(isinstance(m, (nn.ReLU, nn.ReLU6)) for m in gm.modules()), "a ReLU was not replaced"
    funcs = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert not funcs & {F.relu, torch.relu, operator.add, operator.iadd, torch.add, torch.cat}
    targets = call_targets(q)
    assert len(targets) == len(set(targets)), "a module is called twice"
    # one tensor is never quantized twice
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), PACT2):
            src = n.args[0]
            assert not (src.op == "call_module" and isinstance(gm.get_submodule(src.target), PACT2)), n.target
    # parameter names unchanged
    assert {k for k, _ in float_model.named_parameters()} <= {k for k, _ in gm.named_parameters()}


def test_functional_cifar_resnet():
    fm = resnet20()
    q = xnnq.QuantTrainModule(fm, torch.randn(1, 3, 32, 32))
    assert_clean(q, fm)
    mods = dict(q.module.named_modules())
    assert isinstance(mods["layer1.0.add"], AddBlock)
    assert isinstance(mods["input_q"], PACT2) and isinstance(mods["linear_q"], PACT2)
    assert "layer2.0.shortcut.pad" in mods and "layer2.0.shortcut.slice" in mods
    # add → relu: the ReLU's PACT2 quantizes the sum, no quantizer in between
    assert "layer1.0.add_q" not in mods and mods["layer1.0.relu_1"].signed is False
    rep = q.surgery_report()
    assert "layer1.0.add: AddBlock" in rep and "fold" in rep and "replace" in rep
    assert set(fm.state_dict()) <= set(q.module.state_dict())


def test_float_model_not_modified():
    fm = resnet20()
    before = {k: v.clone() for k, v in fm.state_dict().items()}
    q = xnnq.QuantTrainModule(fm, torch.randn(1, 3, 32, 32)).train()
    opt = torch.optim.SGD(q.parameters(), lr=0.1)
    q(torch.randn(4, 3, 32, 32)).sum().backward()
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in fm.state_dict().items())
    assert not any(isinstance(m, PACT2) for m in fm.modules())


class Seg(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 2, 1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = F.relu6(self.conv(x))
        y = self.head(y)
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


def test_interpolate_becomes_constant_resize():
    q = xnnq.QuantTrainModule(Seg(), torch.randn(1, 3, 32, 32))
    resize = [m for m in q.module.modules() if isinstance(m, ResizeWith)]
    assert len(resize) == 1 and resize[0].scale_factor == (2.0, 2.0)
    assert not any(n.op == "call_method" and n.target == "size" for n in q.module.graph.nodes)
    relu6 = [m for m in q.module.modules() if isinstance(m, PACT2) and m.cap == 6.0]
    assert len(relu6) == 1
    q.train()
    assert q(torch.randn(2, 3, 32, 32)).shape == (2, 4, 32, 32)


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.c2(self.act(self.c1(x))))


def test_reused_module_is_split():
    q = xnnq.QuantTrainModule(Shared(), torch.randn(1, 3, 8, 8))
    targets = call_targets(q)
    assert "act" in targets and "act_1" in targets
    assert "split" in q.surgery_report()


class Dynamic(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.inner = Branchy()

    def forward(self, x):
        return self.inner(self.conv(x))


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


def test_untraceable_names_module_line_and_fix():
    with pytest.raises(xnnq.CaptureError) as e:
        xnnq.QuantTrainModule(Dynamic(), torch.randn(1, 3, 4, 4))
    msg = str(e.value)
    assert "`inner`" in msg and "test_surgery.py" in msg and "leaf_modules=['inner']" in msg
    q = xnnq.QuantTrainModule(Dynamic(), torch.randn(1, 3, 4, 4), leaf_modules=["inner"])
    q.train()
    assert q(torch.randn(2, 3, 4, 4)).shape == (2, 3, 4, 4)


@pytest.mark.parametrize(
    "name", ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "shufflenet_v2_x0_5", "googlenet"]
)
def test_torchvision_models(name):
    torch.set_num_threads(2)
    kw = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    fm = getattr(torchvision.models, name)(weights=None, num_classes=10, **kw)
    q = xnnq.QuantTrainModule(fm, torch.randn(1, 3, 64, 64))
    assert_clean(q, fm)
    opt = torch.optim.SGD(q.parameters(), lr=0.01)
    q.train()
    for _ in range(2):
        loss = F.cross_entropy(q(torch.randn(4, 3, 64, 64)), torch.randint(0, 10, (4,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    q.eval()
    out = q(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_verbose_prints_report(capsys):
    xnnq.QuantTrainModule(Shared(), torch.randn(1, 3, 8, 8), verbose=True)
    assert "PACT2" in capsys.readouterr().out


class Ops(nn.Module):
    """Tensor operators written as functionals: each must become a module with its own quantizer."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        s = torch.add(a, b)
        m = a * torch.sigmoid(b)
        c = torch.cat([s, m], 1)
        c = F.max_pool2d(c, 2)
        c = F.avg_pool2d(c, 2)
        c = F.adaptive_avg_pool2d(c, 1)
        return self.fc(torch.flatten(c, 1))


def test_operators_become_modules_with_quantizers():
    q = xnnq.QuantTrainModule(Ops(), torch.randn(1, 3, 16, 16))
    mods = dict(q.module.named_modules())
    kinds = {type(m).__name__ for m in mods.values()}
    assert {
        "AddBlock",
        "MultBlock",
        "CatBlock",
        "IndexMaxPool2d",  # F.max_pool2d -> nn.MaxPool2d, kept as the indices-only pool of the QAT graph
        "AvgPool2d",
        "AdaptiveAvgPool2d",
        "Flatten",
        "Sigmoid",
    } <= kinds
    reasons = {a.reason for a in q.plan.acts}
    assert {
        "input",
        "AddBlock",
        "MultBlock",
        "CatBlock",
        "MaxPool2d",
        "AvgPool2d",
        "AdaptiveAvgPool2d",
        "Linear",
    } <= reasons
    assert not [n for n in q.module.graph.nodes if n.op == "call_function"]
    q.train()
    assert q(torch.randn(2, 3, 16, 16)).shape == (2, 5)
