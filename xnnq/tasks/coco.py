"""COCO-format detection sets (``images/`` + ``instances.json``) as in-memory uint8 tensors and batches.

Images are decoded once per process (cached by path, size and limit) and resized to the detector's
input size when they are not already that size; boxes follow. Targets keep what evaluation needs to map
detections back to the original image: the COCO ``image_id`` and the resize factors.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..data import MEAN, STD


@dataclass
class CocoSet:
    """A decoded COCO detection set.

    ``images``: uint8 N x 3 x H x W (all resized to one size); ``boxes[i]``: float (M, 4) corners in
    the resized image's pixels; ``labels[i]``: (M,) contiguous class index into ``cat_ids``;
    ``scales[i]``: (sx, sy) resized / original; ``crowd[i]``: annotations with ``iscrowd`` are kept out
    of training targets (COCOeval ignores them itself).
    """

    path: Path
    image_ids: list[int]
    images: Tensor
    boxes: list[Tensor]
    labels: list[Tensor]
    scales: list[tuple[float, float]]
    cat_ids: list[int]
    cat_names: list[str]

    def __len__(self) -> int:
        return len(self.image_ids)


_CACHE: dict[tuple, CocoSet] = {}


def load_coco(
    instances_json: str | Path, *, size: int | tuple[int, int] | None = None, limit: int | None = None
) -> CocoSet:
    """Read ``instances_json`` and decode its images (file names relative to the JSON's folder).

    ``size`` (int or (h, w)) resizes every image to that size; with ``size=None`` all images must share
    one size. ``limit`` keeps the first ``limit`` images in ``images`` order.
    """
    path = Path(instances_json).resolve()
    key = (str(path), size, limit)
    if key in _CACHE:
        return _CACHE[key]
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file {path} does not exist")
    data = json.loads(path.read_text())
    for k in ("images", "annotations", "categories"):
        if k not in data:
            raise ValueError(f"{path}: not a COCO detection file (no {k!r} list)")
    cats = sorted(data["categories"], key=lambda c: c["id"])
    cat_index = {c["id"]: i for i, c in enumerate(cats)}
    infos = data["images"][:limit] if limit is not None else data["images"]
    anns: dict[int, list[dict]] = {}
    for a in data["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    target = (size, size) if isinstance(size, int) else size
    images, boxes, labels, scales = [], [], [], []
    for info in infos:
        img = Image.open(path.parent / info["file_name"]).convert("RGB")
        w0, h0 = img.size
        if target is None:
            target = (h0, w0)
            if size is None and images and (h0, w0) != tuple(images[0].shape[:2]):
                raise ValueError(
                    f"{path}: images of different sizes ({info['file_name']} is {w0}x{h0}); pass "
                    "size= to resize them to the detector's input"
                )
        th, tw = target
        if size is None and (h0, w0) != (th, tw):
            raise ValueError(
                f"{path}: images of different sizes ({info['file_name']} is {w0}x{h0}, the first is "
                f"{tw}x{th}); pass size= to resize them to the detector's input"
            )
        if (h0, w0) != (th, tw):
            img = img.resize((tw, th), Image.BILINEAR)
        sx, sy = tw / w0, th / h0
        images.append(np.asarray(img, dtype=np.uint8))
        b, lab = [], []
        for a in anns.get(info["id"], []):
            if a.get("iscrowd", 0):
                continue
            x, y, w, h = a["bbox"]
            if w <= 0 or h <= 0:
                continue
            if a["category_id"] not in cat_index:
                raise ValueError(
                    f"{path}: annotation {a.get('id')} has category_id {a['category_id']} that is not "
                    "in 'categories'"
                )
            b.append([x * sx, y * sy, (x + w) * sx, (y + h) * sy])
            lab.append(cat_index[a["category_id"]])
        boxes.append(torch.tensor(b, dtype=torch.float32).reshape(-1, 4))
        labels.append(torch.tensor(lab, dtype=torch.int64))
        scales.append((sx, sy))
    if not images:
        raise ValueError(f"{path}: no images")
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    out = CocoSet(
        path,
        [i["id"] for i in infos],
        x,
        boxes,
        labels,
        scales,
        [c["id"] for c in cats],
        [c.get("name", str(c["id"])) for c in cats],
    )
    _CACHE[key] = out
    return out


def normalize(images: Tensor, mean=MEAN, std=STD) -> Tensor:
    """uint8 N x 3 x H x W -> float, ``(x / 255 - mean) / std`` (the detector's input)."""
    m = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - m) / s


def augment(
    images: Tensor,
    targets: list[dict],
    gen: torch.Generator,
    *,
    scale: tuple[float, float] = (0.75, 1.25),
    translate: float = 0.1,
) -> tuple[Tensor, list[dict]]:
    """Random horizontal flip, scale (about the centre) and translation of a normalised batch, boxes kept right.

    One ``grid_sample`` for the whole batch (bilinear, zero = the mean colour outside the image). Boxes
    are clipped to the image; a box keeping less than 40 % of its area (or under 4 px) is dropped.
    """
    n, _, h, w = images.shape
    flip = torch.rand(n, generator=gen) < 0.5
    s = torch.empty(n).uniform_(scale[0], scale[1], generator=gen)
    t = (torch.rand(n, 2, generator=gen) * 2 - 1) * translate * torch.tensor([w, h])  # pixels
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = torch.where(flip, -1.0, 1.0) / s  # output -> input: x_in = ±(x_out - t) / s
    theta[:, 1, 1] = 1.0 / s
    theta[:, 0, 2] = -2 * t[:, 0] / w / s * torch.where(flip, -1.0, 1.0)
    theta[:, 1, 2] = -2 * t[:, 1] / h / s
    theta = theta.to(images.device, images.dtype)
    grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=False)
    out = torch.nn.functional.grid_sample(
        images, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    new_targets = []
    for i, tg in enumerate(targets):
        b = tg["boxes"].clone()
        if flip[i]:
            b = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], 1)
        b[:, [0, 2]] = (b[:, [0, 2]] - w / 2) * s[i] + w / 2 + t[i, 0]
        b[:, [1, 3]] = (b[:, [1, 3]] - h / 2) * s[i] + h / 2 + t[i, 1]
        area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        b[:, [0, 2]] = b[:, [0, 2]].clamp(0, w)
        b[:, [1, 3]] = b[:, [1, 3]].clamp(0, h)
        bw, bh = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
        keep = (bw >= 4) & (bh >= 4) & (bw * bh >= 0.4 * area)
        new_targets.append({**tg, "boxes": b[keep], "labels": tg["labels"][keep]})
    return out, new_targets


def iterate(
    ds: CocoSet,
    *,
    batch_size: int,
    train: bool = False,
    seed: int = 0,
    epoch: int = 0,
    scale: tuple[float, float] = (0.75, 1.25),
    mean=MEAN,
    std=STD,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[Tensor, list[dict]]]:
    """Batches of ``(normalised images, targets)``; ``train`` shuffles and augments with ``generator``
    (default: a new one seeded by ``seed`` and ``epoch``)."""
    n = len(ds)
    gen = generator if generator is not None else torch.Generator().manual_seed(seed * 100003 + epoch)
    order = torch.randperm(n, generator=gen).tolist() if train else list(range(n))
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        targets = [
            {"boxes": ds.boxes[i], "labels": ds.labels[i], "image_id": ds.image_ids[i], "scale": ds.scales[i]}
            for i in idx
        ]
        images = normalize(ds.images[idx], mean, std)
        if train:
            images, targets = augment(images, targets, gen, scale=scale)
        yield images, targets


class CocoBatches:
    """Re-iterable batches of a :class:`CocoSet` with a length (what ``xnnq.recipes.qat_finetune`` and a
    ``DataLoader``-style loop take). Every pass is one epoch; with ``train=True`` the passes draw their
    shuffles and augmentations from one generator seeded by ``seed`` and ``epoch``, so the sequence of
    epochs is reproducible and each epoch differs."""

    def __init__(self, ds: CocoSet, *, batch_size: int, train: bool = False, seed: int = 0, epoch: int = 0):
        self.ds, self.batch_size, self.train = ds, batch_size, train
        self.generator = torch.Generator().manual_seed(seed * 100003 + epoch)

    def __len__(self) -> int:
        return (len(self.ds) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[Tensor, list[dict]]]:
        return iterate(self.ds, batch_size=self.batch_size, train=self.train, generator=self.generator)
