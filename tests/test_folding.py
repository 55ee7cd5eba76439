import copy

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import xnnq
from xnnq.layers import QuantConv2d
from xnnq.models.cifar_resnet import resnet20

from conftest import randomize_bn


class CountConvs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.convolution, torch.ops.aten.mkldnn_convolution):
            self.n += 1
        return func(*args, **(kwargs or {}))


def test_quant_off_equals_float_in_eval_and_train():
    fm = randomize_bn(resnet20(), gamma=(0.5, 1.5)).double()
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    q = xnnq.QuantTrainModule(fm, x[:1])
    xnnq.layers.set_quant_enabled(q, False)
    fm.eval(), q.eval()
    assert (q(x) - fm(x)).abs().max().item() < 1e-5
    fm_t, q_t = copy.deepcopy(fm).train(), copy.deepcopy(q).train()
    out_f, out_q = fm_t(x), q_t(x)
    assert (out_q - out_f).abs().max().item() < 1e-5
    # BN running statistics updated identically by the single-conv train path
    fb = dict(fm_t.named_modules())["layer2.1.bn1"]
    qb = q_t.module.get_submodule("layer2.1.bn1")
    assert torch.allclose(fb.running_mean, qb.running_mean, atol=1e-9)
    assert torch.allclose(fb.running_var, qb.running_var, atol=1e-9)


def test_each_conv_computed_once_per_forward():
    fm = resnet20()
    q = xnnq.QuantTrainModule(fm, torch.randn(1, 3, 32, 32)).train()
    n_convs = sum(isinstance(m, nn.Conv2d) for m in fm.modules())
    for mode in (True, False):
        q.train(mode)
        with CountConvs() as c:
            q(torch.randn(2, 3, 32, 32))
        assert c.n == n_convs


def test_eval_forward_is_conv_with_quantized_folded_weights_and_grid_bias():
    fm = randomize_bn(resnet20(), gamma=(0.5, 1.5))
    q = xnnq.QuantTrainModule(fm, torch.randn(1, 3, 32, 32)).train()
    q(torch.randn(8, 3, 32, 32))
    q.eval()
    conv: QuantConv2d = q.module.get_submodule("layer1.0.conv1")
    bn = q.module.get_submodule("layer1.0.bn1")
    in_q = q.module.get_submodule("relu")
    w, b = conv.quantized_weight_bias(bn, in_q)
    s_w = conv.grid_scale(conv.folded_weight_bias(bn)[0])
    assert torch.equal(w / s_w, (w / s_w).round()) and (w / s_w).abs().max() <= 128
    acc_grid = in_q.scale() * s_w
    assert torch.equal(b / acc_grid, (b / acc_grid).round())  # bias on the int32 accumulator grid
    x = torch.randn(2, 16, 32, 32).relu()
    assert torch.equal(conv(x, bn, in_q), torch.nn.functional.conv2d(x, w, b, 1, 1))


def test_weight_clipping_leaves_normal_model_and_clips_outlier():
    from xnnq import data

    fm = resnet20()
    if data.cifar10_available():
        fm.load_state_dict(
            torch.load(data.data_root() / "weights" / "resnet20_cifar10jpg.pt", weights_only=True)[
                "state_dict"
            ]
        )
    q = xnnq.QuantTrainModule(fm, torch.randn(1, 3, 32, 32)).eval()
    for spot in q.plan.weights:
        conv = q.module.get_submodule(spot.name)
        bn = q.module.get_submodule(spot.bn) if spot.bn else None
        w = conv.folded_weight_bias(bn)[0]
        assert torch.equal(conv.constrain(w), w), spot.name
    conv = q.module.get_submodule("layer1.0.conv1")
    w = torch.randn(16, 16, 3, 3)
    w[0, 0, 0, 0] = 100.0
    clipped = conv.constrain(w)
    assert clipped[0, 0, 0, 0] < 100.0 and torch.equal(clipped.flatten()[1:], w.flatten()[1:])


def test_weight_clipping_keeps_structured_outliers():
    # a re-parameterized kernel: one large identity tap per output channel must survive
    q = xnnq.QuantTrainModule(resnet20(), torch.randn(1, 3, 32, 32))
    conv = q.module.get_submodule("layer1.0.conv1")
    w = torch.randn(16, 16, 3, 3) * 0.01
    for c in range(16):
        w[c, c, 1, 1] = 1.0 + 0.1 * c  # ~100σ, 16 of them
    assert torch.equal(conv.constrain(w), w)
