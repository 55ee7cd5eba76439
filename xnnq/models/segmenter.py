"""MosaicSegmenter: a small UNet/DeepLabV3-lite segmentation net for 128x128 Mosaic-10 images.

Shaped like TI's "lite" segmentation models: a CIFAR ResNet-20 body behind a stride-2 stem (the body
runs at H/2: a quarter of the cost of ``stem_stride=1``, which sees the pasted CIFAR objects nearer the
32-pixel scale the body was trained at), a light ASPP on the last features (1x1 and dilated depthwise-separable branches joined by
``torch.cat``), two decoder stages that resize x2 (bilinear, constant scale) and ``torch.cat`` a skip
connection, a 1x1 classifier and, with a stride-2 stem, a final x2 resize to the input size. Only
Conv/BatchNorm/ReLU, ``Resize`` with constant scales and ``Concat``: all TIDL-supported.

``forward`` returns the class logits ``N x num_classes x H x W``; the ArgMax that TI's segmentation
models end with is added at export (``export_onnx(..., argmax=True)``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.resize import ResizeWith
from .cifar_resnet import load_state_dict_file, resnet20


def conv_bn_relu(
    cin: int, cout: int, k: int = 1, stride: int = 1, dilation: int = 1, groups: int = 1
) -> nn.Sequential:
    pad = dilation * (k - 1) // 2
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, pad, dilation=dilation, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def dw_separable(cin: int, cout: int, dilation: int = 1) -> nn.Sequential:
    """Depthwise 3x3 (+BN+ReLU) then pointwise 1x1 (+BN+ReLU), as in TI's lite decoders."""
    return nn.Sequential(conv_bn_relu(cin, cin, 3, dilation=dilation, groups=cin), conv_bn_relu(cin, cout, 1))


class LiteASPP(nn.Module):
    """ASPP without the image-pooling branch: a 1x1 branch and dilated depthwise-separable branches."""

    def __init__(self, cin: int, branch: int, cout: int, dilations: tuple[int, ...] = (2, 4)):
        super().__init__()
        self.b0 = conv_bn_relu(cin, branch, 1)
        self.branches = nn.ModuleList(dw_separable(cin, branch, d) for d in dilations)
        self.project = conv_bn_relu(branch * (1 + len(dilations)), cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([self.b0(x)] + [b(x) for b in self.branches], dim=1))


class MosaicSegmenter(nn.Module):
    """UNet/DeepLabV3-lite on a ResNet-20 body; logits at the input resolution."""

    def __init__(self, num_classes: int = 11, resize_mode: str = "bilinear", stem_stride: int = 2):
        super().__init__()
        if stem_stride not in (1, 2):
            raise ValueError(f"MosaicSegmenter: stem_stride must be 1 or 2, got {stem_stride}")
        body = resnet20()
        self.stem_conv = nn.Conv2d(3, 16, 3, stem_stride, 1, bias=False)
        self.stem_bn = nn.BatchNorm2d(16)
        self.layer1, self.layer2, self.layer3 = body.layer1, body.layer2, body.layer3  # 16, 32, 64 channels
        self.aspp = LiteASPP(64, 32, 64)
        align = False if resize_mode in ("bilinear", "bicubic") else None
        self.up8 = ResizeWith(2.0, resize_mode, align)
        self.dec4 = dw_separable(64 + 32, 48)
        self.up4 = ResizeWith(2.0, resize_mode, align)
        self.dec2 = dw_separable(48 + 16, 32)
        self.classifier = nn.Conv2d(32, num_classes, 1)
        self.up2 = ResizeWith(2.0, resize_mode, align) if stem_stride == 2 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f1 = self.layer1(F.relu(self.stem_bn(self.stem_conv(x))))
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        y = self.aspp(f3)
        y = self.dec4(torch.cat([self.up8(y), f2], dim=1))
        y = self.dec2(torch.cat([self.up4(y), f1], dim=1))
        y = self.classifier(y)
        return self.up2(y) if self.up2 is not None else y

    def load_backbone(self, path: str | Path) -> MosaicSegmenter:
        """Initialise stem and body from a CIFAR-10 ResNet-20 state dict (the linear head is dropped)."""
        sd = load_state_dict_file(path)
        self.stem_conv.weight.data.copy_(sd["conv1.weight"])
        self.stem_bn.load_state_dict(
            {k.removeprefix("bn1."): v for k, v in sd.items() if k.startswith("bn1.")}
        )
        for name in ("layer1", "layer2", "layer3"):
            getattr(self, name).load_state_dict(
                {k.removeprefix(name + "."): v for k, v in sd.items() if k.startswith(name + ".")}
            )
        return self


def mosaic_segmenter(num_classes: int = 11, stem_stride: int = 2) -> MosaicSegmenter:
    """A freshly initialised :class:`MosaicSegmenter` (11 classes: background + the CIFAR-10 classes)."""
    return MosaicSegmenter(num_classes, stem_stride=stem_stride)
