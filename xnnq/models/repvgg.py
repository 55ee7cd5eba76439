"""RepVGG (Ding et al., CVPR 2021): 3x3 conv+BN, 1x1 conv+BN and identity BN branches summed, then ReLU.

:class:`RepVGGBlock` fuses to one 3x3 conv (:func:`xnnq.models.reparam.reparameterize`).
:func:`repvgg_cifar` is a small CIFAR-10 network of such blocks (stage widths near ResNet-20's).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .reparam import Reparameterizable, deploy_sequential, fold_bn, fused_conv, identity_kernel, pad_kernel


def conv_bn(cin: int, cout: int, k: int, stride: int, groups: int = 1) -> nn.Sequential:
    """``Sequential(conv=Conv2d(bias=False), bn=BatchNorm2d)`` with 'same' padding."""
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False))
    seq.add_module("bn", nn.BatchNorm2d(cout))
    return seq


class RepVGGBlock(Reparameterizable):
    """ReLU(BN(conv3x3(x)) + BN(conv1x1(x)) + BN(x)); the identity branch exists when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.dense = conv_bn(cin, cout, 3, stride, groups)
        self.pointwise = conv_bn(cin, cout, 1, stride, groups)
        self.identity = nn.BatchNorm2d(cout) if cin == cout and stride == 1 else None
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dense(x) + self.pointwise(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return self.act(out)

    @torch.no_grad()
    def fused_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The 3x3 kernel and bias equal to the sum of the three branches (eval mode)."""
        w, b = fold_bn(self.dense.conv.weight, None, self.dense.bn)
        w1, b1 = fold_bn(self.pointwise.conv.weight, None, self.pointwise.bn)
        w, b = w + pad_kernel(w1, 3), b + b1
        if self.identity is not None:
            conv = self.dense.conv
            wi, bi = fold_bn(identity_kernel(conv.out_channels, conv.groups, 3, like=w), None, self.identity)
            w, b = w + wi, b + bi
        return w, b

    def deploy_module(self) -> nn.Module:
        return deploy_sequential(fused_conv(self.dense.conv, *self.fused_kernel()), self.act)


class RepNet(nn.Module):
    """A plain CIFAR network: a stem, stages of blocks (the first block of each stage after the first has
    stride 2), global average pooling and a linear classifier.

    ``block(cin, cout, stride)`` builds a block; the stem is ``block(3, stem_width, stem_stride)`` unless ``stem``
    (with ``stem_width`` output channels) is given.
    """

    def __init__(
        self,
        block,
        widths: tuple[int, ...],
        depths: tuple[int, ...],
        num_classes: int = 10,
        stem: nn.Module | None = None,
        stem_width: int | None = None,
        stem_stride: int = 1,
    ):
        super().__init__()
        stem_width = stem_width or widths[0]
        self.stem = stem if stem is not None else block(3, stem_width, stem_stride)
        layers, cin = [], stem_width
        for i, (w, d) in enumerate(zip(widths, depths)):
            for j in range(d):
                layers.append(block(cin, w, 2 if (j == 0 and i > 0) else 1))
                cin = w
        self.stages = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.stages(self.stem(x)))))


def repvgg_cifar(num_classes: int = 10, widths=(48, 96, 192), depths=(2, 2, 2)) -> RepNet:
    """RepVGG for 32x32 inputs: a 32-wide stride-2 stem and three stages (stride 1, 2, 2) at 16, 8, 4 px.

    The stride-2 stem keeps a training epoch at about 3 min on one CPU thread.
    """
    return RepNet(RepVGGBlock, widths, depths, num_classes, stem_width=32, stem_stride=2)
