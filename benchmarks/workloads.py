"""The networks of the issue-13 benchmarks (bench_reference.py, bench_targets.py) in one place: ResNet-20 on
CIFAR-10 and the Mosaic-10 detector and segmenter of the model zoo — the float model, its input, the
calibration and test batches, the PTQ every script runs, and a task metric over precomputed outputs.

* ``resnet20``: ``$XNNQ_DATA/weights/resnet20_cifar10jpg.pt``, 32x32; calibration images drawn from the
  50k training images with ``torch.manual_seed(0); torch.randperm`` (as bench_ptq.py), batches of 100;
  test: the first N JPEG test images. Metric: top-1.
* ``mosaic_detector``: ``load_pretrained("mosaic_detector")`` (SSD, six head outputs), 128x128;
  calibration: the first N Mosaic-10 train images, batches of 32 (as bench_detection.py); test: the first N
  val images. Metric: COCO mAP@[.5:.95] / mAP@.5 (the caffe-SSD decode + NMS of ``xnnq.tasks.detection``).
* ``mosaic_segmenter``: ``load_pretrained("mosaic_segmenter")``, 128x128; calibration: the first N train
  images, batches of 25 (as bench_segmentation.py); test: the first N val images. Outputs are taken as the
  ArgMax export gives them (the class map), followed by the logits. Metric: mIoU / pixel accuracy.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from xnnq.data import batches, cifar10, cifar10_available, data_root

from common import calibrate_timed

MODELS = ("resnet20", "mosaic_detector", "mosaic_segmenter")


def _mosaic() -> Path:
    return data_root() / "mosaic10"


@dataclass(frozen=True)
class Workload:
    """One network of the benchmarks: see the module docstring."""

    name: str
    size: int  # square input side
    calib_batch: int  # calibration batch size
    groups: tuple[tuple[str, tuple[int, ...]], ...]  # (label, output indices) compared together

    def dummy(self, batch: int = 1) -> torch.Tensor:
        return torch.zeros(batch, 3, self.size, self.size)

    def missing(self) -> str | None:
        """Why the data or weights are not there (None: they are)."""
        if self.name == "resnet20":
            if cifar10_available():
                return None
            return f"CIFAR-10 / ResNet-20 weights not found under {data_root()} (set XNNQ_DATA)"
        if (_mosaic() / "val" / "instances.json").is_file():
            return None
        return f"Mosaic-10 not found under {_mosaic()} (set XNNQ_DATA)"

    def float_model(self) -> nn.Module:
        if self.name == "resnet20":
            from xnnq.models.cifar_resnet import resnet20_cifar10

            return resnet20_cifar10(data_root() / "weights" / "resnet20_cifar10jpg.pt").eval()
        from xnnq.models.zoo import load_pretrained

        return load_pretrained(self.name).eval()

    def calibration_batches(self, n: int) -> list[torch.Tensor]:
        if self.name == "resnet20":
            x, y = cifar10("train")
            torch.manual_seed(0)
            idx = torch.randperm(len(y))[:n]
            return [xb for xb, _ in batches(x[idx], y[idx], self.calib_batch)]
        if self.name == "mosaic_detector":
            from xnnq.tasks import detection

            train = _mosaic() / "train" / "instances.json"
            return [x for x, _ in detection.batches(train, batch_size=self.calib_batch, limit=n)]
        from xnnq.tasks import segmentation as seg

        return [x for x, _ in seg.batches(_mosaic(), "train", batch_size=self.calib_batch, limit=n)]

    def test_batches(self, n: int | None, batch: int) -> Iterable[tuple[torch.Tensor, Any]]:
        """``(images, labels)``: class indices, detection targets or masks, of the first ``n`` test images."""
        if self.name == "resnet20":
            x, y = cifar10("test", limit=n)
            return batches(x, y, batch)
        if self.name == "mosaic_detector":
            from xnnq.tasks import detection

            return detection.batches(self.val_json, batch_size=batch, limit=n)
        from xnnq.tasks import segmentation as seg

        return seg.batches(_mosaic(), "val", batch_size=batch, limit=n)

    @property
    def val_json(self) -> Path:
        return _mosaic() / "val" / "instances.json"

    def outputs(self, out: Any) -> list[np.ndarray]:
        """A PyTorch model's output as the exported graph's outputs (the segmenter: class map, then logits)."""
        outs = [out] if isinstance(out, torch.Tensor) else list(out)
        if self.name == "mosaic_segmenter":
            outs = [outs[0].argmax(1, keepdim=True), outs[0]]
        return [o.detach().cpu().numpy() for o in outs]

    def metric(self, float_model: nn.Module) -> Metric:
        return Metric(self, getattr(float_model, "meta_arch", None))


WORKLOADS = {
    "resnet20": Workload("resnet20", 32, 100, (("logits", (0,)),)),
    "mosaic_detector": Workload("mosaic_detector", 128, 32, (("head outputs", (0, 1, 2, 3, 4, 5)),)),
    "mosaic_segmenter": Workload("mosaic_segmenter", 128, 25, (("class map", (0,)), ("logits", (1,)))),
}


def get(name: str) -> Workload:
    if name not in WORKLOADS:
        raise SystemExit(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    return WORKLOADS[name]


def ptq(w: Workload, calib: Sequence[torch.Tensor], model: nn.Module | None = None, **settings):
    """``QuantCalibrateModule(method="mse", **settings)`` (bias correction on) over ``calib``; returns the
    calibrated wrapper in eval mode and the CPU seconds it took."""
    return calibrate_timed(model if model is not None else w.float_model(), w.dummy(), calib, **settings)


class Metric:
    """The task metric accumulated over precomputed outputs (graph-output order, numpy)."""

    def __init__(self, w: Workload, meta_arch=None):
        self.w, self.meta = w, meta_arch
        self.correct = self.n = 0
        self.dets: list[dict] = []
        self.image_ids: list[int] = []
        self.confusion = None

    def update(self, outs: list[np.ndarray], labels: Any) -> None:
        if self.w.name == "resnet20":
            self.correct += int((outs[0].argmax(1) == labels.numpy()).sum())
            self.n += len(labels)
        elif self.w.name == "mosaic_detector":
            self.dets += detections(self.meta, outs, labels)
            self.image_ids += [t["image_id"] for t in labels]
        else:
            from xnnq.tasks import segmentation as seg

            part = seg.confusion_matrix(torch.from_numpy(outs[0]), labels, num_classes=outs[1].shape[1])
            self.confusion = part if self.confusion is None else self.confusion + part

    def result(self) -> dict[str, float]:
        if self.w.name == "resnet20":
            return {"top1": 100.0 * self.correct / max(self.n, 1)}
        if self.w.name == "mosaic_detector":
            from xnnq.tasks.coco import load_coco
            from xnnq.tasks.detection import coco_map

            return coco_map(load_coco(self.w.val_json, limit=1), self.dets, self.image_ids)
        from xnnq.tasks import segmentation as seg

        return seg.scores(self.confusion)


def detections(meta, outs: list[np.ndarray], targets: list[dict]) -> list[dict]:
    """COCO result dicts of head outputs ``outs`` (the decode + NMS of ``xnnq.tasks.detection.evaluate``)."""
    from xnnq.tasks.coco import load_coco
    from xnnq.tasks.detection import postprocess

    cat_ids = load_coco(WORKLOADS["mosaic_detector"].val_json, limit=1).cat_ids
    dets = []
    for t, r in zip(targets, postprocess(meta, [torch.from_numpy(o) for o in outs])):
        sx, sy = t["scale"]
        b = r["boxes"].double()
        b[:, [0, 2]] /= sx
        b[:, [1, 3]] /= sy
        for box, score, label in zip(b.tolist(), r["scores"].tolist(), r["labels"].tolist()):
            dets.append(
                {
                    "image_id": t["image_id"],
                    "category_id": cat_ids[label],
                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                    "score": score,
                }
            )
    return dets
