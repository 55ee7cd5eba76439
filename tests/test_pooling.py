"""IndexMaxPool2d: the max pool of the QAT graph keeps its indices, not its input, with the same numbers."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

import xnnq
from xnnq.layers.pooling import IndexMaxPool2d

from conftest import saved_bytes

CONFIGS = [
    dict(kernel_size=3, stride=2, padding=1),  # ResNet's stem: overlapping windows
    dict(kernel_size=2),  # stride None: the kernel
    dict(kernel_size=3, stride=2, ceil_mode=True),
    dict(kernel_size=(3, 2), stride=(1, 2), padding=(1, 0), dilation=(2, 1)),
]


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_same_output_and_gradient_keeping_only_the_indices(cfg, layout):
    """Values on a coarse grid (many tied maxima, as after a quantizer): the output and the input gradient
    are nn.MaxPool2d's bit for bit, and the only tensor kept for the backward is the int64 indices."""
    x0 = (torch.randn(2, 3, 11, 12) * 4).round() / 4
    if layout == "channels_last":
        x0 = x0.contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(nn.MaxPool2d(**cfg)(x0))
    results = []
    for pool in (nn.MaxPool2d(**cfg), IndexMaxPool2d(**cfg)):
        x = x0.clone().requires_grad_(True)
        y, saved = saved_bytes(pool, x * 1.0)  # a non-leaf input, as in a network
        y.backward(g)
        results.append((y.detach(), x.grad, saved))
    (y_ref, g_ref, saved_ref), (y_new, g_new, saved_new) = results
    assert torch.equal(y_ref, y_new) and torch.equal(g_ref, g_new)
    assert g_ref.stride() == g_new.stride()
    assert saved_ref.get(torch.float32, 0) >= x0.numel() * 4  # nn.MaxPool2d keeps the input
    assert set(saved_new) == {torch.int64} and saved_new[torch.int64] == y_ref.numel() * 8


def test_without_grad_or_with_indices_it_is_nn_maxpool2d():
    x = torch.randn(1, 2, 8, 8)
    pool = IndexMaxPool2d(2, return_indices=True)
    y, idx = pool(x)
    ref, ref_idx = nn.MaxPool2d(2, return_indices=True)(x)
    assert torch.equal(y, ref) and torch.equal(idx, ref_idx)
    with torch.no_grad():
        assert torch.equal(IndexMaxPool2d(3, 2, 1)(x), nn.MaxPool2d(3, 2, 1)(x))


def test_qat_graph_uses_it_and_the_user_model_keeps_its_pool():
    """torchvision's ResNet-18: the QAT copy's stem pool keeps indices only, the user's model is untouched,
    and a QAT step gives the gradients the same QAT model gives with an nn.MaxPool2d there."""
    model = torchvision.models.resnet18(num_classes=10)
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    q = xnnq.QuantTrainModule(model, x[:1]).train()
    pools = [m for m in q.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 1 and type(pools[0]) is IndexMaxPool2d
    assert type(model.maxpool) is nn.MaxPool2d
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    q(x)  # ranges observed
    ref = copy.deepcopy(q)
    ref.module.maxpool = nn.MaxPool2d(3, 2, 1)
    grads = []
    for m in (ref, q):
        m(x).square().sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])
