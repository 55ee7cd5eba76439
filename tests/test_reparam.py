"""Re-parameterized blocks and networks: the deploy form computes the eval-mode function of the training form."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from xnnq.data import cifar10, cifar10_available, normalize
from xnnq.models.mobilenetv1 import ConvBNReLU, mobilenetv1_cifar
from xnnq.models.mobileone import MobileOneBlock, mobileone_cifar
from xnnq.models.qarepvgg import QARepVGGBlock, qarepvgg_cifar
from xnnq.models.reparam import identity_kernel, pad_kernel, reparameterize
from xnnq.models.repvgg import RepVGGBlock, repvgg_cifar
from xnnq.models.zoo import MODELS, checkpoint_path, get_model, load_pretrained

from conftest import randomize_bn, rel_err

SMALL = {"widths": (8, 16, 24), "depths": (1, 2, 1)}


def test_kernel_helpers():
    w = torch.randn(4, 2, 1, 1)
    p = pad_kernel(w, 3)
    assert p.shape == (4, 2, 3, 3) and torch.equal(p[:, :, 1, 1], w[:, :, 0, 0]) and (p != 0).sum() == 8
    x = torch.randn(2, 6, 5, 5)
    for groups in (1, 2, 6):
        k = identity_kernel(6, groups, 3)
        assert torch.allclose(nn.functional.conv2d(x, k, padding=1, groups=groups), x)
    with pytest.raises(ValueError, match="odd"):
        pad_kernel(torch.randn(1, 1, 2, 2), 3)


# the re-parameterizable CIFAR-10 nets of the zoo (the task models have their own tests)
CIFAR_NETS = ("mobilenetv1", "mobileone", "qarepvgg", "repvgg")


@pytest.mark.parametrize(
    "block",
    [
        lambda: RepVGGBlock(6, 6),
        lambda: RepVGGBlock(6, 8, stride=2),
        lambda: RepVGGBlock(6, 6, groups=3),
        lambda: QARepVGGBlock(6, 6),
        lambda: QARepVGGBlock(6, 12, stride=2),
        lambda: QARepVGGBlock(6, 6, groups=2),
        lambda: MobileOneBlock(6, 6, 3, groups=6, branches=3),
        lambda: MobileOneBlock(6, 6, 3, 2, groups=6),
        lambda: MobileOneBlock(6, 10, 1, branches=4),
        lambda: MobileOneBlock(6, 6, 1, branches=1),
        lambda: ConvBNReLU(6, 6, 3, groups=6),
        lambda: ConvBNReLU(6, 9, 1),
    ],
    ids=[
        "repvgg-id",
        "repvgg-s2",
        "repvgg-g3",
        "qarep-id",
        "qarep-s2",
        "qarep-g2",
        "mobileone-dw",
        "mobileone-dw-s2",
        "mobileone-pw",
        "mobileone-pw-id",
        "convbnrelu-dw",
        "convbnrelu-pw",
    ],
)
def test_block_deploy_equivalence(block):
    torch.manual_seed(0)
    b = randomize_bn(block())
    x = torch.randn(4, 6, 9, 9)
    deploy = b.deploy_module()
    convs = [m for m in deploy.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 and not any(isinstance(m, nn.BatchNorm2d) for m in deploy.modules())
    assert rel_err(deploy(x), b(x)) <= 1e-5


@pytest.mark.parametrize("name", CIFAR_NETS)
def test_network_reparameterize(name):
    torch.manual_seed(0)
    build = {
        "repvgg": repvgg_cifar,
        "qarepvgg": qarepvgg_cifar,
        "mobileone": mobileone_cifar,
        "mobilenetv1": mobilenetv1_cifar,
    }[name]
    model = randomize_bn(build(**SMALL))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    deploy = reparameterize(model)
    x = torch.randn(8, 3, 32, 32)
    assert rel_err(deploy(x), model(x)) <= 1e-4
    blocks = sum(1 for m in model.modules() if hasattr(m, "deploy_module"))
    assert sum(isinstance(m, nn.Conv2d) for m in deploy.modules()) == blocks  # one conv per block
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deploy.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # input untouched
    assert not deploy.training


def test_reparameterize_keeps_mode_and_trains():
    model = randomize_bn(repvgg_cifar(**SMALL)).train()
    deploy = reparameterize(model)
    assert deploy.training
    deploy(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in deploy.parameters())


def test_zoo():
    assert set(MODELS) == {*CIFAR_NETS, "mosaic_detector", "mosaic_segmenter"}
    assert isinstance(get_model("qarepvgg").stem, QARepVGGBlock)
    with pytest.raises(KeyError, match="choose one of"):
        get_model("resnet50")


@pytest.mark.data
@pytest.mark.skipif(not cifar10_available(), reason="needs ../shared/data/cifar10 (CIFAR-10 JPEG)")
@pytest.mark.parametrize("name", CIFAR_NETS)
def test_committed_checkpoint(name):
    if not checkpoint_path(name).is_file():
        pytest.skip(f"checkpoint {checkpoint_path(name).name} not trained/committed yet")
    model = load_pretrained(name)
    images, labels = cifar10("test", limit=200)
    x = normalize(images)
    with torch.no_grad():
        y, yd = model(x), reparameterize(model)(x)
    assert rel_err(yd, y) <= 1e-4
    assert float((y.argmax(1) == labels).float().mean()) > 0.4  # trained (chance is 0.1)
