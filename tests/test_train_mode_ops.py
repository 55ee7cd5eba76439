"""Ops whose forward reads ``self.training``: they must follow train()/eval() in the wrapped model, not the mode
the model happened to be in when it was traced."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn

import xnnq


def efficientnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.efficientnet_b0(weights=None, num_classes=10, stochastic_depth_prob=0.5).train()


def test_stochastic_depth_follows_the_wrappers_mode(tmp_path):
    """A torchvision EfficientNet wrapped in train mode (as constructed): its StochasticDepth stays a module, so
    eval is deterministic (no residual branch dropped at random) and training still drops branches; the plan
    gives it no quantizer of its own (the identity in inference, like dropout), and the exported graph holds
    no random op."""
    m = efficientnet()
    x = torch.randn(8, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no mode-dependence warning: the op is handled
        q = xnnq.QuantTrainModule(m, x[:1])
    sd = [n for n, mod in q.module.named_modules() if isinstance(mod, torchvision.ops.StochasticDepth)]
    assert len(sd) > 5
    assert not any("stochastic_depth" in n for n in q.quantizers())
    seen = []
    q.module.get_submodule(sd[-1]).register_forward_hook(lambda mod, a, out: seen.append(out.clone()))
    q.train()
    with torch.no_grad():
        for _ in range(4):
            q(x)
    dropped = [int((s.flatten(1).abs().sum(1) == 0).sum()) for s in seen]
    assert sum(dropped) > 0  # p = 0.5 on the last block: rows are dropped in training
    seen.clear()
    q.eval()
    with torch.no_grad():
        a, b = q(x), q(x)
    assert torch.equal(a, b) and torch.equal(seen[0], seen[1])
    assert all(int((s.flatten(1).abs().sum(1) == 0).sum()) == 0 for s in seen)
    import onnx

    from xnnq.export.api import export_onnx

    export_onnx(q, x[:1], tmp_path / "m.onnx")
    ops = {n.op_type for n in onnx.load(tmp_path / "m.onnx").graph.node}
    assert "Conv" in ops and not ops & {"Dropout", "Bernoulli", "RandomUniformLike", "RandomUniform"}


class TrainOnlyScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        if self.training:
            y = y * 2
        return y


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.block, self.act = TrainOnlyScale(), nn.ReLU()

    def forward(self, x):
        return self.act(self.block(x))


@pytest.mark.parametrize("mode", [True, False])
def test_a_forward_reading_self_training_is_named_with_the_fix(mode):
    """A user module branching on self.training: the wrapper warns, names the module and the fix; with the
    fix (leaf_modules) there is no warning and the branch follows the mode."""
    net = Net().train(mode)
    with pytest.warns(RuntimeWarning, match=r"in module 'block'.*leaf_modules=\['block'\]"):
        xnnq.QuantTrainModule(net, torch.randn(1, 3, 8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = xnnq.QuantTrainModule(net, torch.randn(1, 3, 8, 8), leaf_modules=["block"])
    assert net.training is mode  # the user's model is not modified
    block = q.module.get_submodule("block")
    assert isinstance(block, TrainOnlyScale)  # a leaf: runs as the module, following the mode
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        q.train()
        y_train = block(x)
        q.eval()
        y_eval = block(x)
    torch.testing.assert_close(y_train, 2 * y_eval)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "convnext_tiny"])
def test_torchvision_models_in_train_mode_wrap_without_a_mode_warning(name):
    """No false alarm: torchvision models as constructed (train mode; Dropout, StochasticDepth) trace to the
    same graph in both modes."""
    m = getattr(torchvision.models, name)(weights=None, num_classes=10).train()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        xnnq.QuantTrainModule(m, torch.randn(1, 3, 32, 32))
