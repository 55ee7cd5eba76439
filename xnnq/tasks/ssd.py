"""The SSD meta-architecture: caffe-SSD priors, CENTER_SIZE box coding, matching and the multibox loss.

TIDL's ONNX SSD post-processing (``meta_arch_type`` 3, ``caffe_ssd`` in the meta-architecture prototxt)
follows the original caffe-SSD (Liu et al. 2016) ``PriorBox`` and ``DetectionOutput`` layers. The same
semantics are implemented here so that the boxes decoded in Python are the boxes TIDL decodes:

* priors per feature-map cell, centre ``((x + offset) * step, (y + offset) * step)``, in the order
  ``min_size`` (aspect 1), ``sqrt(min_size * max_size)`` (aspect 1), then each aspect ratio ``r`` (and
  ``1 / r`` when ``flip``) with size ``min_size * sqrt(r) x min_size / sqrt(r)``; normalised by the image
  size; ``clip`` clamps them to [0, 1];
* ``CENTER_SIZE`` decoding with the variances not encoded in the target:
  ``cx = v0 * dx * pw + pcx``, ``cy = v1 * dy * ph + pcy``, ``w = exp(v2 * dw) * pw``, ``h = exp(v3 * dh) * ph``;
* the box conv of a level has ``A * 4`` channels (prior ``a`` owns channels ``4a .. 4a + 3`` = dx, dy, dw, dh),
  the class conv ``A * num_classes`` channels (``num_classes`` includes the background), scores are the
  softmax over the classes of one prior.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_iou, generalized_box_iou_loss


@dataclass(frozen=True)
class PriorBoxParam:
    """One feature level's priors (caffe-SSD ``PriorBoxParameter``, as in TIDL's ``prior_box_param``)."""

    min_size: float
    max_size: float | None
    step: float
    aspect_ratio: tuple[float, ...] = (2.0,)
    flip: bool = True
    clip: bool = False
    variance: tuple[float, float, float, float] = (0.1, 0.1, 0.2, 0.2)
    offset: float = 0.5

    @property
    def ratios(self) -> list[float]:
        """Aspect ratios after the first (aspect 1) prior(s), in caffe's order."""
        out: list[float] = []
        for r in self.aspect_ratio:
            if abs(r - 1.0) < 1e-6 or any(abs(r - o) < 1e-6 for o in out):
                continue
            out.append(r)
            if self.flip:
                out.append(1.0 / r)
        return out

    @property
    def num_priors(self) -> int:
        return 1 + (self.max_size is not None) + len(self.ratios)


@dataclass(frozen=True)
class SSDMetaArch:
    """Everything TIDL's SSD post-processing needs to know about a detector with SSD heads.

    ``num_classes`` counts the background (caffe convention); ``background_label_id`` says which class
    index is the background. ``box_outputs`` / ``class_outputs`` are the indices, in the traceable core's
    flat output tuple, of each level's box and class conv output (one per ``priors`` entry, same order).
    """

    in_width: int
    in_height: int
    num_classes: int
    priors: tuple[PriorBoxParam, ...]
    box_outputs: tuple[int, ...]
    class_outputs: tuple[int, ...]
    background_label_id: int = 0
    nms_threshold: float = 0.45
    top_k: int = 200
    keep_top_k: int = 100
    confidence_threshold: float = 0.01
    code_type: str = "CENTER_SIZE"
    meta_arch_type: int = 3
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        n = len(self.priors)
        if len(self.box_outputs) != n or len(self.class_outputs) != n:
            raise ValueError(
                f"SSDMetaArch: {n} prior levels but {len(self.box_outputs)} box outputs and "
                f"{len(self.class_outputs)} class outputs; give one box and one class output per level"
            )
        if not 0 <= self.background_label_id < self.num_classes:
            raise ValueError(
                f"background_label_id {self.background_label_id} outside 0..{self.num_classes - 1}"
            )

    @property
    def foreground(self) -> list[int]:
        """Class indices that are objects (all but the background), in order."""
        return [c for c in range(self.num_classes) if c != self.background_label_id]


def level_priors(p: PriorBoxParam, feat_h: int, feat_w: int, img_h: int, img_w: int) -> Tensor:
    """Priors of one level as ``(feat_h * feat_w * A, 4)`` normalised ``(xmin, ymin, xmax, ymax)``."""
    sizes = [(p.min_size, p.min_size)]
    if p.max_size is not None:
        s = math.sqrt(p.min_size * p.max_size)
        sizes.append((s, s))
    sizes += [(p.min_size * math.sqrt(r), p.min_size / math.sqrt(r)) for r in p.ratios]
    wh = torch.tensor(sizes, dtype=torch.float64)  # A x 2
    ys, xs = torch.meshgrid(
        torch.arange(feat_h, dtype=torch.float64), torch.arange(feat_w, dtype=torch.float64), indexing="ij"
    )
    cx = ((xs + p.offset) * p.step).reshape(-1, 1)
    cy = ((ys + p.offset) * p.step).reshape(-1, 1)
    boxes = torch.stack(
        [
            (cx - wh[:, 0] / 2) / img_w,
            (cy - wh[:, 1] / 2) / img_h,
            (cx + wh[:, 0] / 2) / img_w,
            (cy + wh[:, 1] / 2) / img_h,
        ],
        dim=-1,
    ).reshape(-1, 4)
    if p.clip:
        boxes = boxes.clamp(0.0, 1.0)
    return boxes.float()


def priors_and_variances(meta: SSDMetaArch, feature_sizes: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
    """All priors (P x 4, normalised corners) and their variances (P x 4), levels concatenated."""
    if len(feature_sizes) != len(meta.priors):
        raise ValueError(f"{len(feature_sizes)} feature maps for {len(meta.priors)} prior levels")
    boxes, var = [], []
    for p, (h, w) in zip(meta.priors, feature_sizes):
        b = level_priors(p, h, w, meta.in_height, meta.in_width)
        boxes.append(b)
        var.append(torch.tensor(p.variance, dtype=torch.float32).expand(len(b), 4))
    return torch.cat(boxes), torch.cat(var)


def flatten_outputs(
    meta: SSDMetaArch, outputs: tuple[Tensor, ...] | list[Tensor]
) -> tuple[Tensor, Tensor, list]:
    """Head conv outputs -> ``(loc N x P x 4, conf N x P x num_classes, feature sizes)`` in prior order."""
    locs, confs, sizes = [], [], []
    for level, (bi, ci) in enumerate(zip(meta.box_outputs, meta.class_outputs)):
        b, c = outputs[bi], outputs[ci]
        n, _, h, w = b.shape
        a = meta.priors[level].num_priors
        if b.shape[1] != 4 * a or c.shape[1] != a * meta.num_classes or c.shape[-2:] != b.shape[-2:]:
            raise ValueError(
                f"level {level}: box output {tuple(b.shape)} / class output {tuple(c.shape)} do not "
                f"match {a} priors x 4 and {a} priors x {meta.num_classes} classes"
            )
        locs.append(b.permute(0, 2, 3, 1).reshape(n, h * w * a, 4))
        confs.append(c.permute(0, 2, 3, 1).reshape(n, h * w * a, meta.num_classes))
        sizes.append((h, w))
    return torch.cat(locs, 1), torch.cat(confs, 1), sizes


def decode(loc: Tensor, priors: Tensor, variances: Tensor) -> Tensor:
    """caffe-SSD ``CENTER_SIZE`` decoding (variances not in the target) -> normalised corners."""
    pw, ph = priors[..., 2] - priors[..., 0], priors[..., 3] - priors[..., 1]
    pcx, pcy = (priors[..., 0] + priors[..., 2]) / 2, (priors[..., 1] + priors[..., 3]) / 2
    cx = variances[..., 0] * loc[..., 0] * pw + pcx
    cy = variances[..., 1] * loc[..., 1] * ph + pcy
    w = torch.exp(variances[..., 2] * loc[..., 2]) * pw
    h = torch.exp(variances[..., 3] * loc[..., 3]) * ph
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def encode(boxes: Tensor, priors: Tensor, variances: Tensor) -> Tensor:
    """Inverse of :func:`decode` (normalised corners -> ``dx, dy, dw, dh``)."""
    pw, ph = priors[..., 2] - priors[..., 0], priors[..., 3] - priors[..., 1]
    pcx, pcy = (priors[..., 0] + priors[..., 2]) / 2, (priors[..., 1] + priors[..., 3]) / 2
    w = (boxes[..., 2] - boxes[..., 0]).clamp_min(1e-6)
    h = (boxes[..., 3] - boxes[..., 1]).clamp_min(1e-6)
    cx, cy = (boxes[..., 0] + boxes[..., 2]) / 2, (boxes[..., 1] + boxes[..., 3]) / 2
    return torch.stack(
        [
            (cx - pcx) / pw / variances[..., 0],
            (cy - pcy) / ph / variances[..., 1],
            torch.log(w / pw) / variances[..., 2],
            torch.log(h / ph) / variances[..., 3],
        ],
        dim=-1,
    )


def match(gt_boxes: Tensor, priors: Tensor, threshold: float = 0.5) -> Tensor:
    """SSD matching: index of the ground-truth box of each prior, -1 for background.

    A prior takes the box it overlaps most when the IoU is at least ``threshold``; every box also keeps
    the prior that overlaps it most (bipartite step of the SSD paper), if it overlaps any.
    """
    if len(gt_boxes) == 0:
        return torch.full((len(priors),), -1, dtype=torch.long, device=priors.device)
    iou = box_iou(gt_boxes, priors)  # G x P
    best_iou, best_gt = iou.max(0)
    best_prior_iou, best_prior = iou.max(1)
    forced = best_prior_iou > 0  # a box overlapping no prior at all stays unmatched
    best_gt[best_prior[forced]] = torch.arange(len(gt_boxes), device=priors.device)[forced]
    best_iou[best_prior[forced]] = 2.0
    return torch.where(best_iou >= threshold, best_gt, torch.full_like(best_gt, -1))


def multibox_loss(
    meta: SSDMetaArch,
    outputs,
    targets: list[dict],
    *,
    neg_pos_ratio: float = 3.0,
    iou_threshold: float = 0.5,
    giou_weight: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """SSD loss: softmax cross-entropy with 3:1 hard-negative mining + smooth-L1 (+ GIoU) on the positives.

    ``targets[i]["boxes"]`` are ``(xmin, ymin, xmax, ymax)`` in input pixels, ``targets[i]["labels"]``
    the foreground class index 0..K-1 (mapped to the meta-architecture's non-background classes).
    """
    loc, conf, sizes = flatten_outputs(meta, outputs)
    priors, var = priors_and_variances(meta, sizes)
    priors, var = priors.to(loc.device), var.to(loc.device)
    scale = torch.tensor([meta.in_width, meta.in_height] * 2, dtype=loc.dtype, device=loc.device)
    fg = torch.tensor(meta.foreground, device=loc.device)
    cls_t, box_t = [], []
    for t in targets:
        boxes = t["boxes"].to(loc.device, loc.dtype) / scale
        idx = match(boxes, priors, iou_threshold)
        labels = torch.full_like(idx, meta.background_label_id)
        pos = idx >= 0
        labels[pos] = fg[t["labels"].to(loc.device)[idx[pos]]]
        cls_t.append(labels)
        box_t.append(boxes[idx.clamp_min(0)] if len(boxes) else torch.zeros_like(priors))
    cls_t, box_t = torch.stack(cls_t), torch.stack(box_t)
    pos = cls_t != meta.background_label_id
    num_pos = pos.sum().clamp_min(1).to(loc.dtype)
    ce = F.cross_entropy(conf.reshape(-1, meta.num_classes), cls_t.reshape(-1), reduction="none").view_as(
        cls_t
    )
    with torch.no_grad():  # hard negatives: the highest-loss background priors, neg_pos_ratio per positive
        neg_ce = ce.masked_fill(pos, -1.0)
        rank = neg_ce.argsort(1, descending=True).argsort(1)
        neg = rank < (neg_pos_ratio * pos.sum(1, keepdim=True)).clamp_max(pos.shape[1] - 1)
    cls_loss = ce[pos | neg].sum() / num_pos
    pri = priors.expand_as(box_t)
    v = var.expand_as(box_t)
    reg_loss = F.smooth_l1_loss(loc[pos], encode(box_t, pri, v)[pos], reduction="sum", beta=0.11) / num_pos
    total = cls_loss + reg_loss
    parts = {"cls": cls_loss.detach(), "reg": reg_loss.detach()}
    if giou_weight:
        giou = (
            generalized_box_iou_loss(decode(loc[pos], pri[pos], v[pos]), box_t[pos], reduction="sum")
            / num_pos
        )
        total = total + giou_weight * giou
        parts["giou"] = giou.detach()
    return total, parts
