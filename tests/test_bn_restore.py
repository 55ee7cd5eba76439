"""BN restore: identity BatchNorms with measured (train-mode) statistics after convs; function unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from xnnq.models.mobileone import mobileone_cifar
from xnnq.models.reparam import reparameterize
from xnnq.models.repvgg import repvgg_cifar
from xnnq.utils.bn_restore import fold_restored_bn, model_restore_bn


def deploy_model(build=repvgg_cifar, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    model = build(widths=(8, 16, 24), depths=(1, 1, 1))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.bias.data.uniform_(-0.5, 0.5)
    return reparameterize(model.eval())


def calibrator(batches: list[torch.Tensor], mode: str = "eval"):
    def run(model: nn.Module) -> None:
        model.train(mode == "train")
        for x in batches:
            model(x)

    return run


@pytest.mark.parametrize("build", [repvgg_cifar, mobileone_cifar])
def test_function_unchanged(build):
    model = deploy_model(build)
    data = [torch.randn(16, 3, 32, 32) for _ in range(3)]
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    out = model_restore_bn(model, calibrator(data))
    assert out is model and not model.training
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == len(convs)
    for name in convs:
        seq = model.get_submodule(name)
        assert isinstance(seq.conv, nn.Conv2d) and isinstance(seq.bn, nn.BatchNorm2d)
    with torch.no_grad():
        assert float((model(x) - ref).abs().max() / ref.abs().max()) <= 1e-5
    # the statistics are real (not the identity statistics an eval-mode calibration would leave)
    assert all(float((bn.running_var - 1).abs().max()) > 1e-2 for bn in bns)
    assert all(float(bn.running_mean.abs().max()) > 1e-3 for bn in bns)
    assert all(torch.allclose(bn.weight, torch.sqrt(bn.running_var + bn.eps)) for bn in bns)
    assert all(torch.equal(bn.bias, bn.running_mean) for bn in bns)


def test_statistics_match_train_mode_batchnorm():
    """Same mean and unbiased variance as a BatchNorm in training mode fed the conv output of the whole set."""
    model = deploy_model()
    data = [torch.randn(10, 3, 32, 32) for _ in range(2)]
    stem_conv = model.stem.conv
    with torch.no_grad():
        y = torch.cat([stem_conv(x) for x in data])
    ref_bn = nn.BatchNorm2d(y.shape[1], momentum=None).train()
    ref_bn(y)
    model_restore_bn(model, calibrator(data, "train"))  # the mode calibrate_func chooses does not matter
    bn = model.stem.conv.bn
    assert torch.allclose(bn.running_mean, ref_bn.running_mean, atol=1e-5)
    assert torch.allclose(bn.running_var, ref_bn.running_var, rtol=1e-4, atol=1e-6)


def test_existing_batchnorms_untouched_and_layers_subset():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 1))
    model[1].running_mean.fill_(0.3)
    before = model[1].running_mean.clone()
    x = torch.randn(4, 3, 8, 8)
    ref = model.eval()(x)
    model_restore_bn(model, calibrator([torch.randn(6, 3, 8, 8)], "train"), layers=["3"])
    assert torch.equal(model[1].running_mean, before)
    assert isinstance(model[0], nn.Conv2d) and isinstance(model[3].bn, nn.BatchNorm2d)
    assert torch.allclose(model(x), ref, atol=1e-6)


def test_bad_input_errors():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1))
    with pytest.raises(KeyError, match="no module named 'nope'"):
        model_restore_bn(model, calibrator([]), layers=["nope"])
    with pytest.raises(TypeError, match="not a Conv"):
        model_restore_bn(model, calibrator([]), layers=["1"])
    with pytest.raises(ValueError, match="saw 0 output values"):
        model_restore_bn(model, calibrator([]))
    assert isinstance(model[0], nn.Conv2d)  # restored to its original structure after the error


@torch.no_grad()
def test_fold_restored_bn_roundtrip():
    model = deploy_model(mobileone_cifar)
    x = torch.randn(4, 3, 32, 32)
    ref = model(x)
    n_convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    model_restore_bn(model, calibrator([torch.randn(8, 3, 32, 32)]))
    stem = model.stem.conv
    stem.bn.weight.data.mul_(2.0)  # a changed BN (as CLE leaves it) must fold exactly too
    stem.bn.bias.data.mul_(2.0)
    expected_stem = stem(x)
    stem.bn.weight.data.div_(2.0)
    stem.bn.bias.data.div_(2.0)
    restored_out = model(x)
    stem.bn.weight.data.mul_(2.0)
    stem.bn.bias.data.mul_(2.0)
    fold_restored_bn(model)
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == n_convs
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert isinstance(model.stem.conv, nn.Conv2d)
    assert torch.allclose(model.stem.conv(x), expected_stem, atol=1e-5)
    assert float((restored_out - ref).abs().max() / ref.abs().max()) <= 1e-5
