"""QARepVGG (Chu et al., AAAI 2023, "Make RepVGG Greater Again"): a quantization-friendly RepVGG block.

BN(conv3x3+BN (x) + conv1x1(x) + x) then ReLU: the 1x1 and identity branches carry no BatchNorm (so no
identity-BN channel of near-zero variance can blow up the fused kernel) and one BatchNorm after the sum
controls the variance growth of the summed branches. Trained with plain weight decay (no custom L2).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .reparam import Reparameterizable, deploy_sequential, fold_bn, fused_conv, identity_kernel, pad_kernel
from .repvgg import RepNet, conv_bn


class QARepVGGBlock(Reparameterizable):
    """ReLU(BN(BN(conv3x3(x)) + conv1x1(x) + x)); the identity term exists when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1):
        super().__init__()
        self.dense = conv_bn(cin, cout, 3, stride, groups)
        self.pointwise = nn.Conv2d(cin, cout, 1, stride, 0, groups=groups, bias=False)
        self.has_identity = cin == cout and stride == 1
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dense(x) + self.pointwise(x)
        if self.has_identity:
            out = out + x
        return self.act(self.bn(out))

    @torch.no_grad()
    def fused_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The 3x3 kernel and bias equal to the whole block before the ReLU (eval mode)."""
        w, b = fold_bn(self.dense.conv.weight, None, self.dense.bn)
        w = w + pad_kernel(self.pointwise.weight, 3)
        if self.has_identity:
            w = w + identity_kernel(w.shape[0], self.dense.conv.groups, 3, like=w)
        return fold_bn(w, b, self.bn)

    def deploy_module(self) -> nn.Module:
        return deploy_sequential(fused_conv(self.dense.conv, *self.fused_kernel()), self.act)


def qarepvgg_cifar(num_classes: int = 10, widths=(48, 96, 192), depths=(2, 2, 2)) -> RepNet:
    """QARepVGG for 32x32 inputs, same layout as :func:`xnnq.models.repvgg.repvgg_cifar`."""
    return RepNet(QARepVGGBlock, widths, depths, num_classes, stem_width=32, stem_stride=2)
