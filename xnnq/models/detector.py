"""A small TIDL-friendly SSD detector: ResNet-20 backbone (stride-2 stem), FPN neck, plain conv heads.

Every layer is one TIDL knows: 3x3/1x1 convolutions with BatchNorm and ReLU, an FPN top-down path with
nearest x2 ``Resize`` (constant scale) and ``Add``, and per level one box conv (``A * 4`` channels) and one
class conv (``A * (K + 1)`` channels, background at index 0) — the raw inputs of TIDL's SSD
post-processing (``meta_arch_type`` 3). ``forward`` maps a normalised image batch to those head outputs,
``(box_p3, box_p4, box_p5, cls_p3, cls_p4, cls_p5)``; decoding and NMS are outside the graph
(:mod:`xnnq.tasks.detection`), as TIDL runs them itself. ``model.meta_arch`` describes the heads.

The backbone is the CIFAR ResNet-20 with its first conv at stride 2, so that the 32x32-trained filters
see objects of 20-70 px at about the scale they were trained on, and the cost stays near 0.17 GMAC
per 128x128 image; its CIFAR-10 weights initialise it (:func:`mosaic_detector`).
"""

from __future__ import annotations

from pathlib import Path

import torch.nn.functional as F
from torch import nn

from ..tasks.ssd import PriorBoxParam, SSDMetaArch
from ..utils.io import load_state_dict_file
from .cifar_resnet import resnet20


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def default_priors(image_size: int = 128) -> tuple[PriorBoxParam, ...]:
    """Priors of the three levels (strides 8, 16, 32) for objects of about 10-80 px on a 128 px image."""
    s = image_size / 128.0
    return (
        PriorBoxParam(16 * s, 32 * s, 8.0, aspect_ratio=(1.5,)),
        PriorBoxParam(32 * s, 64 * s, 16.0, aspect_ratio=(1.5,)),
        PriorBoxParam(64 * s, 96 * s, 32.0, aspect_ratio=(1.5,)),
    )


class SSDHeads(nn.Module):
    """Per level: one 3x3 conv-BN-ReLU, then a 3x3 box conv and a 3x3 class conv (with bias)."""

    def __init__(self, channels: int, num_priors: list[int], num_classes: int):
        super().__init__()
        self.towers = nn.ModuleList(conv_bn(channels, channels) for _ in num_priors)
        self.box = nn.ModuleList(nn.Conv2d(channels, 4 * a, 3, 1, 1) for a in num_priors)
        self.cls = nn.ModuleList(nn.Conv2d(channels, a * num_classes, 3, 1, 1) for a in num_priors)
        for conv in self.cls:  # background prior probability ~0.99 at the start (focal-loss init)
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
            conv.bias.data.view(-1, num_classes)[:, 0] = 4.6
        for conv in self.box:
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, feats):
        towers = [t(f) for t, f in zip(self.towers, feats)]
        return tuple(b(t) for b, t in zip(self.box, towers)) + tuple(c(t) for c, t in zip(self.cls, towers))


class MosaicDetector(nn.Module):
    """SSD with a ResNet-20 backbone and an FPN neck (see the module docstring)."""

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 128,
        neck_channels: int = 64,
        priors: tuple[PriorBoxParam, ...] | None = None,
    ):
        super().__init__()
        r = resnet20()
        r.conv1.stride = (2, 2)
        self.conv1, self.bn1 = r.conv1, r.bn1
        self.layer1, self.layer2, self.layer3 = r.layer1, r.layer2, r.layer3  # strides 2, 4, 8
        self.layer4 = conv_bn(64, 128, stride=2)  # stride 16
        self.layer5 = conv_bn(128, 128, stride=2)  # stride 32
        c = neck_channels
        self.lat3, self.lat4, self.lat5 = (
            conv_bn(64, c, 1, relu=False),
            conv_bn(128, c, 1, relu=False),
            conv_bn(128, c, 1, relu=False),
        )
        self.smooth3, self.smooth4, self.smooth5 = conv_bn(c, c), conv_bn(c, c), conv_bn(c, c)
        priors = priors or default_priors(image_size)
        self.heads = SSDHeads(c, [p.num_priors for p in priors], num_classes + 1)
        n = len(priors)
        self.meta_arch = SSDMetaArch(
            in_width=image_size,
            in_height=image_size,
            num_classes=num_classes + 1,
            priors=tuple(priors),
            box_outputs=tuple(range(n)),
            class_outputs=tuple(range(n, 2 * n)),
            background_label_id=0,
        )

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        c3 = self.layer3(self.layer2(self.layer1(x)))
        c4 = self.layer4(c3)
        c5 = self.layer5(c4)
        p5 = self.lat5(c5)
        p4 = self.lat4(c4) + F.interpolate(p5, scale_factor=2.0, mode="nearest")
        p3 = self.lat3(c3) + F.interpolate(p4, scale_factor=2.0, mode="nearest")
        return self.heads((self.smooth3(p3), self.smooth4(p4), self.smooth5(p5)))


def mosaic_detector(
    backbone_weights: str | Path | None = None, num_classes: int = 10, image_size: int = 128
) -> MosaicDetector:
    """The detector, its backbone optionally initialised from a CIFAR ResNet-20 state dict (``linear`` dropped)."""
    model = MosaicDetector(num_classes=num_classes, image_size=image_size)
    if backbone_weights is not None:
        state = {
            k: v for k, v in load_state_dict_file(backbone_weights).items() if not k.startswith("linear.")
        }
        _, unexpected = model.load_state_dict(state, strict=False)
        if unexpected:
            raise ValueError(
                f"{backbone_weights}: keys that are not ResNet-20 backbone weights: {unexpected[:5]}"
            )
    return model
