import copy

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import xnnq
from xnnq.layers import QuantConv2d
from xnnq.models.cifar_resnet import resnet20

from conftest import randomize_bn, saved_bytes


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


class _BigConvNet(nn.Module):
    """Two convolutions with >= 64K weights (recomputed in the backward) and a small depthwise one (kept)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 128, 3, padding=1, bias=False), nn.BatchNorm2d(128), nn.ReLU())
        self.dw = nn.Sequential(
            nn.Conv2d(128, 128, 3, padding=1, groups=128, bias=False), nn.BatchNorm2d(128)
        )
        self.big = nn.Sequential(
            nn.Conv2d(128, 128, 3, padding=1, bias=False), nn.BatchNorm2d(128), nn.ReLU()
        )
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        return self.fc(self.big(self.dw(self.stem(x))).mean((2, 3)))


@pytest.mark.parametrize("range_learning", ["statistics", "tqt"])
@pytest.mark.parametrize("bn_frozen", [False, True])
def test_recomputed_weight_path_gives_bit_identical_outputs_and_gradients(
    monkeypatch, range_learning, bn_frozen
):
    """Recomputing the weight path of large layers in the backward (to free its weight-sized intermediates)
    changes no output and no gradient, bit for bit, for BN in training and frozen, statistics and TQT. (With
    BN in training and statistics the C weight path, which keeps nothing weight-sized, serves the layer by
    default: the torch ops are asked for here.)"""
    import xnnq.layers.quant_weight as qw
    from xnnq.layers import fused

    monkeypatch.setitem(fused._state, "mode", "0")

    torch.manual_seed(0)
    model = _BigConvNet()
    x, y = torch.randn(4, 3, 12, 12), torch.randint(0, 10, (4,))
    results = []
    for min_numel in (qw.RECOMPUTE_MIN_NUMEL, 1 << 62):  # recomputed / kept
        monkeypatch.setattr(qw, "RECOMPUTE_MIN_NUMEL", min_numel)
        torch.manual_seed(1)
        q = xnnq.QuantTrainModule(model, x[:1], range_learning=range_learning)
        q.train()
        q(x)  # first batch: ranges (and thresholds) from statistics
        if bn_frozen:
            xnnq.utils.freeze_bn(q)
        # bytes of the tensors autograd keeps for the backward (not the parameters themselves)
        out, saved = saved_bytes(q, x, exclude={p.data_ptr() for p in q.parameters()})
        nn.functional.cross_entropy(out, y).backward()
        grads = {n: p.grad.clone() for n, p in q.named_parameters() if p.grad is not None}
        results.append((out.detach(), grads, sum(saved.values())))
    (out_a, grads_a, saved_a), (out_b, grads_b, saved_b) = results
    # the big layer's weight-sized intermediates are no longer kept (at least its 1-byte fake-quant mask)
    assert saved_b - saved_a >= 128 * 128 * 9
    assert torch.equal(out_a, out_b)
    assert grads_a.keys() == grads_b.keys() and any("big" in n for n in grads_a)
    for n in grads_a:
        assert torch.equal(grads_a[n], grads_b[n]), n


def test_torch_compile_trains_the_qat_model_with_batchnorm_in_training():
    """``torch.compile(qmodel)`` with BatchNorm in training: BatchNorm updates its running variance in place
    after the folded weight's graph read it; the compiled steps run (no autograd version error) and, with
    torch's graph capture and autograd tracing but eager kernels (``aot_eager``), match eager steps."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    randomize_bn(model)
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(3)
    ]
    losses = {}
    for mode in ("eager", "compiled"):
        q = xnnq.QuantTrainModule(copy.deepcopy(model), torch.randn(1, 3, 8, 8)).train()
        step = torch.compile(q, backend="aot_eager") if mode == "compiled" else q
        opt = torch.optim.SGD(q.parameters(), lr=0.05)
        losses[mode] = []
        for x, y in batches:
            loss = nn.functional.cross_entropy(step(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[mode].append(loss.item())
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-5, abs=1e-6), losses
