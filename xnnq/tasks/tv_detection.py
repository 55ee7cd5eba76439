"""Traceable cores of torchvision detectors (backbone + neck + head convs) and their meta-architectures.

A torchvision detector bundles a resize/normalise transform and a post-processing step with its
network; TIDL needs the network alone, ending at the head convs. :func:`torchvision_core` returns a
module mapping a normalised image batch to the flat tuple ``(box convs..., class convs...)`` — one per
feature level, before torchvision reshapes them — plus the matching meta-architecture:

* ``SSD`` / ``SSDLite`` -> :class:`~xnnq.tasks.ssd.SSDMetaArch` (caffe_ssd): torchvision's
  ``DefaultBoxGenerator`` builds the caffe-SSD priors (``min_size = s_k``, ``max_size = s_k+1``,
  ``step = image / feature size``, each aspect ratio and its inverse), its box coder weights (10, 10, 5, 5)
  are the variances (0.1, 0.1, 0.2, 0.2) and its scores are a softmax with background 0;
* ``RetinaNet`` -> :class:`~xnnq.tasks.meta_arch.RetinaNetMetaArch` (tidl_retinanet, sigmoid scores).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from .meta_arch import RetinaNetMetaArch
from .ssd import PriorBoxParam, SSDMetaArch


class SSDCore(nn.Module):
    """torchvision SSD / SSDLite without transform and post-processing."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.backbone = model.backbone
        self.box = model.head.regression_head.module_list
        self.cls = model.head.classification_head.module_list

    def forward(self, x):
        feats = list(self.backbone(x).values())
        return tuple(m(f) for m, f in zip(self.box, feats)) + tuple(m(f) for m, f in zip(self.cls, feats))


class RetinaNetCore(nn.Module):
    """torchvision RetinaNet without transform and post-processing (head towers shared across levels)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.backbone = model.backbone
        self.box_tower, self.box = model.head.regression_head.conv, model.head.regression_head.bbox_reg
        self.cls_tower, self.cls = (
            model.head.classification_head.conv,
            model.head.classification_head.cls_logits,
        )

    def forward(self, x):
        feats = list(self.backbone(x).values())
        return tuple(self.box(self.box_tower(f)) for f in feats) + tuple(
            self.cls(self.cls_tower(f)) for f in feats
        )


def _feature_sizes(core: nn.Module, size: tuple[int, int]) -> list[tuple[int, int]]:
    was = core.training
    core.eval()
    with torch.no_grad():
        feats = list(core.backbone(torch.zeros(1, 3, *size)).values())
    core.train(was)
    return [tuple(f.shape[-2:]) for f in feats]


def ssd_meta_arch(model: nn.Module, core: SSDCore, size: tuple[int, int]) -> SSDMetaArch:
    gen = model.anchor_generator
    h, w = size
    if h != w:
        raise ValueError(f"ssd_meta_arch: caffe_ssd has one step per level; the input {w}x{h} is not square")
    sizes = _feature_sizes(core, size)
    priors, clamped = [], []
    for k, (_fh, fw) in enumerate(sizes):
        s_k, s_next = gen.scales[k], gen.scales[k + 1]
        if gen.clip and (s_next > 1 or any(s_k * math.sqrt(r) > 1 for r in gen.aspect_ratios[k])):
            clamped.append(k)
        step = w / (fw if gen.steps is None else w / gen.steps[k])
        priors.append(
            PriorBoxParam(
                s_k * w,
                s_next * w,
                float(step),
                tuple(float(r) for r in gen.aspect_ratios[k]),
                flip=True,
                clip=False,
            )
        )
    if clamped:
        warnings.warn(
            f"ssd_meta_arch: levels {clamped} have priors wider or taller than the image; torchvision "
            "clamps their width/height to the image size, caffe_ssd (clip: false) keeps them, so TIDL's "
            "boxes for those priors differ from torchvision's",
            stacklevel=3,
        )
    n = len(priors)
    return SSDMetaArch(
        in_width=w,
        in_height=h,
        num_classes=model.head.classification_head.num_columns,
        priors=tuple(priors),
        box_outputs=tuple(range(n)),
        class_outputs=tuple(range(n, 2 * n)),
        background_label_id=0,
        nms_threshold=model.nms_thresh,
        top_k=model.topk_candidates,
        keep_top_k=model.detections_per_img,
        confidence_threshold=model.score_thresh,
    )


def retinanet_meta_arch(model: nn.Module, core: RetinaNetCore, size: tuple[int, int]) -> RetinaNetMetaArch:
    gen = model.anchor_generator
    h, w = size
    sizes = _feature_sizes(core, size)
    base, ratios = gen.sizes[0], gen.aspect_ratios[0]
    stride = h / sizes[0][0]
    n = len(sizes)
    return RetinaNetMetaArch(
        in_width=w,
        in_height=h,
        num_classes=model.head.classification_head.num_classes,
        box_outputs=tuple(range(n)),
        class_outputs=tuple(range(n, 2 * n)),
        aspect_ratio=tuple(float(r) for r in ratios),
        octave_base_scale=float(base[0] / stride),
        scales_per_octave=len(base),
        box_coder_weights=tuple(float(v) for v in model.box_coder.weights),
        nms_threshold=model.nms_thresh,
        top_k=model.topk_candidates,
        keep_top_k=model.detections_per_img,
        confidence_threshold=model.score_thresh,
    )


def torchvision_core(
    model: nn.Module, size: int | tuple[int, int]
) -> tuple[nn.Module, SSDMetaArch | RetinaNetMetaArch]:
    """``(core, meta_arch)`` of a torchvision ``SSD`` or ``RetinaNet`` for ``size`` (h, w) inputs.

    The core shares the model's modules (wrap it with xnnq, which copies it; the model is not modified).
    """
    from torchvision.models.detection.retinanet import RetinaNet
    from torchvision.models.detection.ssd import SSD

    size = (size, size) if isinstance(size, int) else tuple(size)
    if isinstance(model, SSD):
        core = SSDCore(model).train(model.training)
        core.meta_arch = ssd_meta_arch(model, core, size)
    elif isinstance(model, RetinaNet):
        core = RetinaNetCore(model).train(model.training)
        core.meta_arch = retinanet_meta_arch(model, core, size)
    else:
        raise TypeError(f"torchvision_core: {type(model).__name__} is not a torchvision SSD or RetinaNet")
    return core, core.meta_arch
