"""Cross-layer equalization + high-bias absorption: pairs, grouped-channel mapping, function preserved,
and the QARepVGG failure (an identity-BN channel of near-zero variance) recovered by BN restore + CLE."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from xnnq.models.qarepvgg import QARepVGGBlock
from xnnq.models.reparam import reparameterize
from xnnq.models.repvgg import RepNet, RepVGGBlock
from xnnq.utils.bn_restore import fold_restored_bn, model_restore_bn
from xnnq.utils.cle import cross_layer_equalize, equalize_pair
from xnnq.utils.graph_pairs import LayerPair, find_layer_pairs

from conftest import rel_err


class FunctionalRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.b(F.relu(self.a(x)))


class Branching(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        return self.b(y) + y


def test_find_pairs():
    seq = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 1),
        nn.BatchNorm2d(6),
        nn.PReLU(6),
        nn.Conv2d(6, 6, 3, groups=6),
        nn.Identity(),
        nn.Conv2d(6, 5, 1),
        nn.ReLU6(),
        nn.Conv2d(5, 5, 1),
        nn.Flatten(),
        nn.Linear(5 * 4, 7),
        nn.ReLU(),
        nn.Linear(7, 2),
    )
    assert find_layer_pairs(seq) == [
        LayerPair("0", "1", "relu", "3", "4"),
        LayerPair("3", "4", "prelu", "6", None),
        LayerPair("6", None, "identity", "8", None),
        LayerPair("12", None, "relu", "14", None),
    ]  # not across ReLU6
    assert find_layer_pairs(FunctionalRelu()) == [LayerPair("a", None, "relu", "b", None)]
    assert find_layer_pairs(Branching()) == []  # the activation has two users
    shared = nn.Conv2d(4, 4, 1)
    assert find_layer_pairs(nn.Sequential(shared, nn.ReLU(), shared)) == []  # one module used twice


def reference_equalize(w1: torch.Tensor, w2: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel loop over the definition: channel i of conv1 feeds group i // (C/g), slot i % (C/g)."""
    w1, w2 = w1.clone(), w2.clone()
    c = w1.shape[0]
    per_group, out_per_group = c // groups, w2.shape[0] // groups
    for i in range(c):
        g, j = divmod(i, per_group)
        rows = slice(g * out_per_group, (g + 1) * out_per_group)
        s = (w1[i].abs().max() / w2[rows, j].abs().max()).sqrt()
        w1[i] /= s
        w2[rows, j] *= s
    return w1, w2


@pytest.mark.parametrize(
    "groups,cout2",
    [(1, 5), (8, 8), (8, 16), (2, 6), (4, 4)],
    ids=["dense", "depthwise", "depthwise-x2", "groups2", "groups4"],
)
def test_grouped_channel_mapping(groups, cout2):
    torch.manual_seed(groups)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, cout2, 3, padding=1, groups=groups)
    )
    with torch.no_grad():
        model[0].weight.mul_(torch.logspace(-2, 2, 8).view(8, 1, 1, 1))  # very unequal channel ranges
    x = torch.randn(4, 3, 10, 10)
    ref = model(x).detach()
    w1_ref, w2_ref = reference_equalize(model[0].weight.detach(), model[2].weight.detach(), groups)
    cross_layer_equalize(model, x, iterations=1, hba=False)
    assert torch.allclose(model[0].weight, w1_ref, rtol=1e-5, atol=1e-7)
    assert torch.allclose(model[2].weight, w2_ref, rtol=1e-5, atol=1e-7)
    assert rel_err(model(x).detach(), ref) <= 1e-5
    # equalized: r1_i == r2_i for every channel
    r1 = model[0].weight.detach().flatten(1).abs().amax(1)
    r2 = (
        model[2]
        .weight.detach()
        .abs()
        .amax((2, 3))
        .view(groups, cout2 // groups, 8 // groups)
        .amax(1)
        .flatten()
    )
    assert torch.allclose(r1, r2, rtol=1e-5)


@pytest.mark.parametrize(
    "act", [nn.ReLU(), nn.PReLU(6, 0.1), nn.Identity()], ids=["relu", "prelu", "identity"]
)
def test_function_preserved_with_bn_and_linear(act):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        act,
        nn.Conv2d(6, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 4, 1),
        nn.Flatten(),
        nn.Linear(4 * 36, 8),
        nn.ReLU(),
        nn.Linear(8, 3),
    )
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.1, 4)
            m.weight.data.uniform_(0.05, 3)
    model.eval()
    x = torch.randn(8, 3, 6, 6)
    ref = model(x).detach()
    cross_layer_equalize(model, x, iterations=3, hba=False)
    assert rel_err(model(x).detach(), ref) <= 1e-4
    assert len(find_layer_pairs(model)) == 3


def test_threshold_and_clamp_on_dead_channels():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1))
    with torch.no_grad():
        model[0].weight[1] = 0.0  # dead output channel (constant = bias)
        model[2].weight[:, 2] = 0.0  # input channel nobody uses
    x = torch.randn(2, 3, 4, 4)
    pair = find_layer_pairs(model)[0]
    s = equalize_pair(model, pair, threshold=1e-6, max_scale=1e3)
    assert torch.isfinite(model[0].weight).all() and torch.isfinite(model[0].bias).all()
    assert s[1] == 1 and s[2] == 1
    model2 = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU(), nn.Conv2d(2, 2, 1))
    with torch.no_grad():
        model2[0].weight[0] *= 1e8
    s = equalize_pair(model2, find_layer_pairs(model2)[0], threshold=1e-12, max_scale=100.0)
    assert float(s.max()) == 100.0
    assert model(x).isfinite().all()


def hba_model(padding: int) -> nn.Sequential:
    """conv1 → BN (pre-activations confined to [β-|γ|, β+|γ|], so ReLU(x-c)+c = ReLU(x)) → ReLU → conv2."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(4, 4, 1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 2 * padding + 1, padding=padding),
    )
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(4).view(4, 4, 1, 1))
        model[1].weight.copy_(torch.tensor([0.5, 1.0, 0.2, -0.3]))
        model[1].bias.copy_(torch.tensor([3.0, 0.5, 1.0, 2.0]))  # c = [1.5, 0, 0.4, 1.1]
    return model.eval()


@torch.no_grad()
def test_hba_exact_and_absorbs():
    model = hba_model(padding=0)
    x = torch.rand(8, 4, 5, 5) * 2 - 1  # BN input in [-1, 1]
    ref = model(x).detach()
    act_max_before = model[:3](x).amax((0, 2, 3)).detach()
    cross_layer_equalize(model, x, iterations=1, hba=True)
    assert rel_err(model(x).detach(), ref) <= 1e-5
    bn = model[1]
    assert float((bn.bias - 3 * bn.weight.abs()).max()) <= 1e-6  # nothing left to absorb
    act_max_after = model[:3](x).amax((0, 2, 3)).detach()
    assert float(act_max_after[0] / act_max_before[0]) < 0.7  # the high-bias channel's range shrank


@torch.no_grad()
def test_hba_skips_padded_conv_unless_asked():
    x = torch.rand(8, 4, 5, 5) * 2 - 1
    default, padded = hba_model(padding=1), hba_model(padding=1)
    cross_layer_equalize(default, x, iterations=1, hba=True)
    cross_layer_equalize(padded, x, iterations=1, hba=True, hba_padded=True)
    assert (
        float((default[1].bias - 3 * default[1].weight.abs()).max()) > 0.1
    )  # left alone: not exact at borders
    assert float((padded[1].bias - 3 * padded[1].weight.abs()).max()) <= 1e-6
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    assert rel_err(padded(x).detach()[inner], default(x).detach()[inner]) <= 1e-5  # exact away from borders


def test_errors():
    with pytest.raises(ValueError, match="iterations"):
        cross_layer_equalize(nn.Conv2d(1, 1, 1), torch.randn(1, 1, 2, 2), iterations=0)

    class Untraceable(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(TypeError, match="torch.fx-traceable"):
        cross_layer_equalize(Untraceable(), torch.randn(1, 1, 2, 2))


# --- the QARepVGG failure: an identity-BN channel of near-zero variance -----------------------------------


def pow2_quant(t: torch.Tensor, bits: int, signed: bool = True) -> torch.Tensor:
    """Per-tensor power-of-2 symmetric (or unsigned) fake quantization, as TIDL does."""
    qmax = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    scale = 2.0 ** torch.ceil(torch.log2(t.abs().max().clamp_min(1e-12) / qmax))
    return (t / scale).round().clamp(-qmax - 1 if signed else 0, qmax) * scale


@torch.no_grad()
def fake_ptq(model: nn.Module, calib: torch.Tensor) -> nn.Module:
    """A minimal stand-in for PTQ: 8-bit pow2 weights (BN folded) and 8-bit pow2 ReLU outputs (max-calibrated)."""
    q = fold_restored_bn(copy.deepcopy(model)).eval()
    for m in q.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.weight.copy_(pow2_quant(m.weight, 8))
    acts = [m for m in q.modules() if isinstance(m, nn.ReLU)]
    maxes: dict[nn.Module, torch.Tensor] = {}
    hooks = [a.register_forward_hook(lambda m, i, o: maxes.__setitem__(m, o.max())) for a in acts]
    q(calib)
    for h in hooks:
        h.remove()
    for a in acts:
        a.register_forward_hook(lambda m, i, o: pow2_quant(o.clamp(max=maxes[m]), 8, signed=False))
    return q


@torch.no_grad()
def near_zero_variance_net(block: type[nn.Module]) -> nn.Module:
    """A 3-block net whose stem output channel 3 has near-zero variance (BN γ = 1e-3), with BN running
    statistics measured on data: the next RepVGG block's identity BN then fuses to a ~300x outlier."""
    torch.manual_seed(0)
    model = RepNet(block, (8, 16), (2, 1), num_classes=10, stem_width=8)
    bns = [model.stem.dense.bn, model.stem.bn if block is QARepVGGBlock else model.stem.pointwise.bn]
    for bn in bns:
        bn.weight[3], bn.bias[3] = 1e-3, 0.0
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()(torch.randn(64, 3, 16, 16))
    return model.eval()


def output_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def test_identity_bn_outlier_collapses_ptq_and_restore_cle_recovers():
    deploy = reparameterize(near_zero_variance_net(RepVGGBlock))
    calib, x = torch.randn(32, 3, 16, 16), torch.randn(32, 3, 16, 16)
    ref = deploy(x)
    kernel_max = [float(m.weight.abs().max()) for m in deploy.modules() if isinstance(m, nn.Conv2d)]
    assert kernel_max[1] > 100 * max(kernel_max[0], kernel_max[2])  # the identity-BN outlier
    assert output_error(fake_ptq(deploy, calib)(x), ref) > 0.2  # per-tensor PTQ collapses

    model_restore_bn(deploy, lambda m: m(calib))
    cross_layer_equalize(deploy, calib)
    assert rel_err(deploy(x), ref) <= 1e-4  # function kept (no HBA into these padded 3x3 convs)
    folded = fold_restored_bn(copy.deepcopy(deploy))
    kernel_max = [float(m.weight.abs().max()) for m in folded.modules() if isinstance(m, nn.Conv2d)]
    assert max(kernel_max) < 3
    assert output_error(fake_ptq(deploy, calib)(x), ref) < 0.05  # recovered


@torch.no_grad()
def test_qarepvgg_block_has_no_outlier():
    deploy = reparameterize(near_zero_variance_net(QARepVGGBlock))
    calib, x = torch.randn(32, 3, 16, 16), torch.randn(32, 3, 16, 16)
    kernel_max = [float(m.weight.abs().max()) for m in deploy.modules() if isinstance(m, nn.Conv2d)]
    assert max(kernel_max) < 3
    assert output_error(fake_ptq(deploy, calib)(x), deploy(x)) < 0.05  # PTQ fine without CLE
