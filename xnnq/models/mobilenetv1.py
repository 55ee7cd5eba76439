"""MobileNetV1 (Howard et al. 2017) for 32x32 inputs: depthwise-separable conv+BN+ReLU units.

Its :class:`ConvBNReLU` units are :class:`~xnnq.models.reparam.Reparameterizable`, so
:func:`~xnnq.models.reparam.reparameterize` gives the BN-folded deploy form like for the other nets.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .reparam import Reparameterizable, deploy_sequential, fold_bn, fused_conv
from .repvgg import RepNet


class ConvBNReLU(Reparameterizable):
    """ReLU(BN(conv(x))) with 'same' padding; deploys as one biased conv + ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    def deploy_module(self) -> nn.Module:
        with torch.no_grad():
            return deploy_sequential(
                fused_conv(self.conv, *fold_bn(self.conv.weight, self.conv.bias, self.bn)), self.act
            )


def separable_unit(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """Depthwise 3x3 (stride) then pointwise 1x1, each conv+BN+ReLU: ``Sequential(dw, pw)``."""
    seq = nn.Sequential()
    seq.add_module("dw", ConvBNReLU(cin, cin, 3, stride, groups=cin))
    seq.add_module("pw", ConvBNReLU(cin, cout, 1))
    return seq


def mobilenetv1_cifar(num_classes: int = 10, widths=(64, 128, 256), depths=(2, 2, 2)) -> RepNet:
    """MobileNetV1 for 32x32 inputs: a 3x3 stride-2 conv stem (32 wide) and stages of separable units
    at 16, 8, 4 px."""
    stem_width = 32
    return RepNet(
        separable_unit,
        widths,
        depths,
        num_classes,
        stem=ConvBNReLU(3, stem_width, 3, 2),
        stem_width=stem_width,
    )
