"""MobileOne (Vasu et al., CVPR 2023): over-parameterized depthwise / pointwise blocks.

:class:`MobileOneBlock` sums ``branches`` k×k conv+BN branches, a 1x1 conv+BN "scale" branch (when k > 1)
and a BN skip branch (when shapes allow), then applies ReLU; it fuses to one k×k conv. A MobileOne unit
is a depthwise 3x3 block followed by a pointwise 1x1 block.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .reparam import Reparameterizable, deploy_sequential, fold_bn, fused_conv, identity_kernel, pad_kernel
from .repvgg import RepNet, conv_bn


class MobileOneBlock(Reparameterizable):
    """ReLU(Σ_b BN_b(conv_k×k,b(x)) + BN(conv1x1(x)) + BN(x))."""

    def __init__(
        self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1, groups: int = 1, branches: int = 2
    ):
        super().__init__()
        if branches < 1:
            raise ValueError(f"MobileOneBlock: branches must be >= 1, got {branches}")
        self.convs = nn.ModuleList(conv_bn(cin, cout, kernel_size, stride, groups) for _ in range(branches))
        self.scale = conv_bn(cin, cout, 1, stride, groups) if kernel_size > 1 else None
        self.skip = nn.BatchNorm2d(cout) if cin == cout and stride == 1 else None
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.skip(x) if self.skip is not None else 0.0
        if self.scale is not None:
            out = out + self.scale(x)
        for branch in self.convs:
            out = out + branch(x)
        return self.act(out)

    @torch.no_grad()
    def fused_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The k×k kernel and bias equal to the sum of all branches (eval mode)."""
        ref = self.convs[0].conv
        k = ref.kernel_size[0]
        w = torch.zeros_like(ref.weight)
        b = torch.zeros(ref.out_channels, dtype=w.dtype, device=w.device)
        parts = [fold_bn(branch.conv.weight, None, branch.bn) for branch in self.convs]
        if self.scale is not None:
            ws, bs = fold_bn(self.scale.conv.weight, None, self.scale.bn)
            parts.append((pad_kernel(ws, k), bs))
        if self.skip is not None:
            parts.append(fold_bn(identity_kernel(ref.out_channels, ref.groups, k, like=w), None, self.skip))
        for wi, bi in parts:
            w, b = w + wi, b + bi
        return w, b

    def deploy_module(self) -> nn.Module:
        return deploy_sequential(fused_conv(self.convs[0].conv, *self.fused_kernel()), self.act)


def mobileone_unit(cin: int, cout: int, stride: int = 1, branches: int = 2) -> nn.Sequential:
    """Depthwise 3x3 MobileOne block (stride) then pointwise 1x1 MobileOne block: ``Sequential(dw, pw)``."""
    seq = nn.Sequential()
    seq.add_module("dw", MobileOneBlock(cin, cin, 3, stride, groups=cin, branches=branches))
    seq.add_module("pw", MobileOneBlock(cin, cout, 1, 1, groups=1, branches=branches))
    return seq


def mobileone_cifar(
    num_classes: int = 10, widths=(64, 128, 256), depths=(2, 2, 2), branches: int = 2
) -> RepNet:
    """MobileOne for 32x32 inputs: a 3x3 stride-2 MobileOne stem (32 wide) and stages of depthwise+pointwise
    units at 16, 8, 4 px."""
    stem_width = 32
    stem = MobileOneBlock(3, stem_width, 3, 2, groups=1, branches=branches)
    return RepNet(
        lambda cin, cout, stride: mobileone_unit(cin, cout, stride, branches),
        widths,
        depths,
        num_classes,
        stem=stem,
        stem_width=stem_width,
    )
