"""The C weight path (xnnq.layers.fused_weight) against the torch ops it replaces: values and gradients bit for
bit, on single layers with every case the weight rule has (dead channels, clipped and kept outliers, shifts,
per-channel, 16 bits, BatchNorm in training / frozen / absent) and on whole models."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import xnnq
from xnnq.layers import fused_weight
from xnnq.layers.fake_quant import ceil_log2, pow2_ceil, weight_scale_from_max
from xnnq.layers.quant_weight import QuantConv2d, QuantLinear
from xnnq.layers.tqt import octave_centre

from conftest import saved_bytes


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def _weights(case: str, shape: tuple[int, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(shape, generator=g) * 0.1
    if case == "outlier":  # one isolated weight far beyond 15 sigma: clipped
        w.view(-1)[7] = 40.0
    elif case == "structure":  # one per output channel beyond 15 sigma: kept
        w[:, 0] = 9.0
    elif case == "tiny":  # below the smallest range
        w *= 2.0**-30
    elif case == "pow2":  # the largest weight a few ulps above a power of two
        w.view(-1)[5] = torch.nextafter(torch.tensor(0.5), torch.tensor(1.0)) + 2.0**-23
    elif case == "zeros":
        w.zero_()
    return w


def _layer(
    kind: str, case: str, per_channel: bool, nbits: int, shift: int, bn_mode: str, constrain: bool = True
):
    if kind == "conv":
        float_layer, bn = nn.Conv2d(8, 16, 3, bias=False), nn.BatchNorm2d(16)
        x = torch.randn(4, 8, 10, 10)
    elif kind == "depthwise":
        float_layer, bn = nn.Conv2d(16, 16, 3, groups=16, bias=False), nn.BatchNorm2d(16)
        x = torch.randn(4, 16, 10, 10)
    else:
        float_layer, bn = nn.Linear(24, 16), nn.BatchNorm1d(16)
        x = torch.randn(6, 24)
    with torch.no_grad():
        float_layer.weight.copy_(_weights(case, float_layer.weight.shape))
        bn.weight.uniform_(-1.5, 1.5)
        bn.weight[2] = 0.0  # a dead channel (zero-initialized residual BN, pruned)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
    cls = QuantConv2d if kind != "linear" else QuantLinear
    layer = cls.from_float(
        float_layer, bits=nbits, per_channel=per_channel, constrain_weights=constrain, name=kind
    )
    layer.weight_range_shift.fill_(shift)
    if bn_mode == "none":
        bn = None
    elif bn_mode == "frozen":
        bn.eval()
    return layer, bn, x


def _step(layer, bn, x):
    """Output and the gradients of weight, bias, and BatchNorm's parameters for a fixed upstream gradient."""
    for p in [*layer.parameters(), *(bn.parameters() if bn is not None else [])]:
        p.grad = None
    out = layer(x, bn)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(5)))
    grads = [p.grad for p in [*layer.parameters(), *(bn.parameters() if bn is not None else [])]]
    return [out.detach(), *grads]


def _graph_names(t: torch.Tensor) -> set[str]:
    seen, stack = set(), [t.grad_fn]
    while stack:
        f = stack.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        stack.extend(g for g, _ in f.next_functions)
    return {type(f).__name__ for f in seen}


@pytest.mark.parametrize("case", ["plain", "outlier", "structure", "tiny", "pow2", "zeros"])
@pytest.mark.parametrize(
    "kind,per_channel,nbits,shift",
    [
        ("conv", False, 8, 0),
        ("conv", True, 8, 1),
        ("depthwise", False, 8, 0),
        ("depthwise", True, 16, 0),
        ("linear", False, 16, 2),
    ],
)
@pytest.mark.parametrize("bn_mode", ["train", "frozen", "none"])
@pytest.mark.parametrize("constrain", [True, False], ids=["clip", "noclip"])
def test_a_layer_is_bit_identical_to_the_torch_ops(
    fused_mode, case, kind, per_channel, nbits, shift, bn_mode, constrain
):
    layer, bn, x = _layer(kind, case, per_channel, nbits, shift, bn_mode, constrain)
    results = {}
    for mode in (False, True):
        fused_mode(mode)
        if mode:  # the C path serves this layer
            assert "_WeightQuantBackward" in _graph_names(copy.deepcopy(layer)(x, copy.deepcopy(bn)))
        l2, b2 = copy.deepcopy(layer), copy.deepcopy(bn)
        results[mode] = _step(l2, b2, x)
        with torch.no_grad():  # inference (QuantTestModule, export) too
            results[mode].append(l2.eval()(x, b2.eval() if b2 is not None else None))
    for a, b in zip(results[False], results[True]):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(bits(a), bits(b))  # signed zeros too


def test_models_with_per_channel_and_16_bit_layers_train_bit_identically(fused_mode):
    import torchvision

    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 3, 64, 64, generator=g), torch.randint(0, 10, (2,), generator=g)
    model = torchvision.models.mobilenet_v2(num_classes=10)
    runs = {}
    for mode in (False, True):
        fused_mode(mode)
        torch.manual_seed(0)
        q = xnnq.QuantTrainModule(
            copy.deepcopy(model),
            x[:1],
            per_channel_q="depthwise",
            bitwidth_overrides={"first": 16, "last": 16},
        ).train()
        opt = torch.optim.SGD(q.parameters(), lr=0.05, momentum=0.9)
        seen = []
        for _ in range(3):
            opt.zero_grad()
            out = q(x)
            F.cross_entropy(out, y).backward()
            seen += [out.detach(), *[p.grad.clone() for p in q.parameters()]]
            opt.step()
        runs[mode] = seen + [p.detach().clone() for p in q.parameters()]
    assert len(runs[False]) == len(runs[True])
    for a, b in zip(runs[False], runs[True]):
        assert torch.equal(bits(a), bits(b))


def test_a_non_finite_weight_takes_the_torch_ops(fused_mode):
    layer, bn, x = _layer("conv", "plain", False, 8, 0, "train")
    with torch.no_grad():
        layer.weight[0, 0, 0, 0] = float("nan")
    outs = {}
    for mode in (False, True):
        fused_mode(mode)
        l2 = copy.deepcopy(layer)
        assert fused_weight.train_weight(l2, l2._channel_view(torch.ones(16))) is None
        outs[mode] = l2(x, copy.deepcopy(bn))
    torch.testing.assert_close(outs[True], outs[False], equal_nan=True, rtol=0, atol=0)


def test_nothing_weight_sized_is_kept_for_the_backward(fused_mode):
    layer, bn, x = _layer("conv", "plain", False, 8, 0, "train")
    from xnnq.layers.bn_fold import bn_scale

    saved = {}
    for mode in (False, True):
        fused_mode(mode)
        c = layer._channel_view(bn_scale(bn))
        fn = fused_weight.train_weight if mode else type(layer)._train_weight
        out, by_dtype = saved_bytes(fn, layer, c, exclude={layer.weight.data_ptr(), c.data_ptr()})
        assert out is not None
        saved[mode] = sum(by_dtype.values())
    assert saved[True] <= 4  # the scale
    assert saved[False] >= layer.weight.numel()


def test_ceil_log2_is_exact_where_float32_log2_rounds():
    for k in range(-40, 20):
        p = torch.tensor(2.0**k)
        above = torch.nextafter(p, torch.tensor(float("inf")))
        assert ceil_log2(p).item() == k
        assert ceil_log2(above).item() == k + 1
        assert pow2_ceil(above).item() == 2.0 ** max(k + 1, -24)  # ranges below 2^-24 are 2^-24
        assert octave_centre(above).item() == max(k + 1, -24) - 0.5  # a learned threshold starts there
    assert ceil_log2(torch.tensor([float("nan"), float("inf")])).isnan().all()
    # a weight maximum one ulp above 2^-5 rounds to code 64 on the grid of 2^-4: the finer grid's scale
    m = torch.nextafter(torch.tensor(2.0**-5), torch.tensor(1.0))
    assert weight_scale_from_max(m, 8).item() == 2.0 ** (-5 - 7)


@pytest.mark.parametrize("per_channel,shift", list(itertools.product((False, True), (0, 1))))
def test_the_c_scales_are_weight_scale_from_max(fused_mode, per_channel, shift):
    """The scale rule in C against the torch function on maxima across the whole float32 range."""
    fused_mode(True)
    layer, _, _ = _layer("conv", "plain", per_channel, 8, shift, "none")
    g = torch.Generator().manual_seed(0)
    e = torch.randint(-40, 20, (16,), generator=g).float()
    m = torch.exp2(e) * torch.tensor([1.0, 1.0000001, 1.5, 1.9999999] * 4)
    m[3] = 32.5 * 2.0**-9  # the finer-grid boundary, exactly
    with torch.no_grad():
        layer.weight.copy_((torch.rand(layer.weight.shape, generator=g) - 0.5) * m.view(-1, 1, 1, 1))
        layer.weight.view(16, -1)[:, 0] = m
    wq, scale = fused_weight.quantize_weight(layer, layer.weight)
    mx = (
        layer.weight.detach().abs().amax(dim=(1, 2, 3)) if per_channel else layer.weight.detach().abs().amax()
    )
    assert torch.equal(scale, weight_scale_from_max(mx, 8, True, layer.weight_range_shift))
