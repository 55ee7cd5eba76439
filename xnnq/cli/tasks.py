"""``xnnq quantize --task detection | segmentation``: PTQ or QAT of a detector or a segmenter, its exports and
their mAP / mIoU.

The data folder holds ``train/`` and ``val/``; detection: each with ``instances.json`` (COCO format) and
its images; segmentation: each with ``images/`` and ``masks/`` (see :mod:`xnnq.tasks.segmentation`).
Training and evaluation are those of :mod:`xnnq.tasks.detection` / :mod:`xnnq.tasks.segmentation`;
the export is the task's (a detector's ONNX with its meta-architecture prototxt, a segmenter's ending in
``ArgMax``), in the formats of ``--target``.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import data
from ..targets import export_formats
from .errors import CliError

TASKS = ("classification", "detection", "segmentation")


class _Task:
    """One task's data, loss, metric and export, as the quantize command uses them."""

    name: str

    def __init__(self, root: Path, model: nn.Module, args: argparse.Namespace):
        self.root, self.args = root, args

    def dummy(self) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model_or_path: nn.Module | Path) -> dict[str, float]:
        raise NotImplementedError

    def calibration_images(self, limit: int) -> Iterable[torch.Tensor]:
        raise NotImplementedError

    def train_batches(self) -> Iterable:
        raise NotImplementedError

    def loss(self) -> Callable:
        raise NotImplementedError

    def export(self, q: nn.Module, path: Path, fmt: str) -> Path:
        raise NotImplementedError


class _Detection(_Task):
    name = "detection"

    def __init__(self, root: Path, model: nn.Module, args: argparse.Namespace):
        from ..tasks import detection

        super().__init__(root, model, args)
        self.train_json, self.val_json = (root / s / "instances.json" for s in ("train", "val"))
        for p in (self.train_json, self.val_json):
            if not p.is_file():
                raise CliError(
                    f"--task detection: {p} is missing; --data needs train/ and val/, each with a COCO "
                    "instances.json and its images"
                )
        try:
            self.meta = detection.find_meta_arch(model)
        except (TypeError, ValueError, AttributeError) as e:
            raise CliError(
                f"--task detection: --model {args.model} has no meta_arch ({e}). A detector for xnnq is a "
                "traceable core (image in, head outputs out) with an SSDMetaArch as model.meta_arch: see "
                "docs/README_detection.md (or xnnq.tasks.tv_detection.torchvision_core for torchvision's SSD "
                "and RetinaNet)"
            ) from e

    def dummy(self) -> torch.Tensor:
        return torch.zeros(1, 3, self.meta.in_height, self.meta.in_width)

    def evaluate(self, model_or_path):
        from ..tasks import detection

        return detection.evaluate(
            model_or_path,
            self.val_json,
            batch_size=self.args.batch_size,
            limit=self.args.limit_test,
            meta_arch=None if isinstance(model_or_path, Path) else self.meta,
            progress=not self.args.no_progress,
        )

    def calibration_images(self, limit: int):
        from ..tasks import detection

        for images, _ in detection.batches(self.train_json, batch_size=self.args.batch_size, limit=limit):
            yield images

    def train_batches(self):
        from ..tasks import detection

        return detection.batches(
            self.train_json, batch_size=self.args.batch_size, train=True, limit=self.args.limit_train
        )

    def loss(self):
        from ..tasks.ssd import multibox_loss

        meta = self.meta
        return lambda outputs, targets: multibox_loss(meta, outputs, targets)[0]

    def export(self, q, path, fmt):
        from ..tasks import detection

        return detection.export(q, path, format=fmt, meta_arch=self.meta)


class _SegmentationBatches:
    """Re-iterable augmented training batches of a segmentation folder (each pass reshuffled)."""

    def __init__(self, root: Path, batch_size: int, limit: int | None, n: int):
        self.root, self.batch_size, self.limit = root, batch_size, limit
        self.n = n if limit is None else min(n, limit)
        self.generator = torch.Generator().manual_seed(0)

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def __iter__(self):
        from ..tasks import segmentation as seg

        return seg.batches(
            self.root,
            "train",
            batch_size=self.batch_size,
            limit=self.limit,
            train=True,
            generator=self.generator,
        )


class _Segmentation(_Task):
    name = "segmentation"

    def __init__(self, root: Path, model: nn.Module, args: argparse.Namespace):
        from ..tasks import segmentation as seg

        super().__init__(root, model, args)
        for split in ("train", "val"):
            for sub in ("images", "masks"):
                if not (root / split / sub).is_dir():
                    raise CliError(
                        f"--task segmentation: {root / split / sub} is missing; --data needs train/ and val/, "
                        "each with images/ and masks/ (8-bit PNG class indices of the same stem)"
                    )
        images, _ = seg.load_split(root, "val", 1)
        if images.shape[0] == 0:
            raise CliError(f"--task segmentation: no images in {root / 'val' / 'images'}")
        self.size = tuple(images.shape[-2:])
        self.n_train = sum(
            1 for p in (root / "train" / "images").iterdir() if p.suffix.lower() in seg.IMAGE_EXTENSIONS
        )

    def dummy(self) -> torch.Tensor:
        return torch.zeros(1, 3, *self.size)

    def evaluate(self, model_or_path):
        from ..tasks import segmentation as seg

        return seg.evaluate(
            model_or_path,
            self.root,
            "val",
            batch_size=self.args.batch_size,
            limit=self.args.limit_test,
            progress=not self.args.no_progress,
        )

    def calibration_images(self, limit: int):
        from ..tasks import segmentation as seg

        for images, _ in seg.batches(self.root, "train", batch_size=self.args.batch_size, limit=limit):
            yield images

    def train_batches(self):
        return _SegmentationBatches(self.root, self.args.batch_size, self.args.limit_train, self.n_train)

    def loss(self):
        from ..tasks.segmentation import IGNORE_INDEX

        return lambda logits, masks: F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX)

    def export(self, q, path, fmt):
        from ..tasks import segmentation as seg

        return seg.export(q, path, format=fmt)


def _headline(metrics: dict[str, Any]) -> str:
    return " ".join(f"{k} {v:.2f}" for k, v in metrics.items() if isinstance(v, float))


def quantize_task(args: argparse.Namespace, kw: dict[str, Any], model: nn.Module, weights: str | None) -> int:
    """The quantize command for ``--task detection | segmentation`` (``kw``: the wrapper's options)."""
    from ..quantize import QuantTrainModule
    from ..recipes import qat_finetune, threshold_optimizers
    from .steps import calibrate_on, for_chip, save_quant, write_summary

    t0 = time.perf_counter()
    root = Path(args.data) if args.data else data.data_root() / "mosaic10"
    if not root.is_dir():
        raise CliError(
            f"--data {root} does not exist"
            + ("" if args.data else " (the default: set XNNQ_DATA or pass --data)")
        )
    task: _Task = (_Detection if args.task == "detection" else _Segmentation)(root, model, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    dummy = task.dummy()
    float_metrics = task.evaluate(model)
    if args.mode == "ptq":
        batches = math.ceil(args.calib_images / args.batch_size)
        inputs = task.calibration_images(args.calib_images)
        q = calibrate_on(model, dummy, inputs, batches, method=args.method, kwargs=kw, progress=progress)
    else:
        qmodel = QuantTrainModule(model, dummy, **kw)
        q = qat_finetune(
            qmodel,
            task.train_batches(),
            epochs=args.epochs,
            optimizer=[
                torch.optim.AdamW(qmodel.non_range_parameters(), lr=args.lr, weight_decay=0.0),
                *threshold_optimizers(qmodel),
            ],
            loss_fn=task.loss(),
            progress=progress,
        )
    quant_metrics = task.evaluate(q)
    config = {
        "task": task.name,
        "model": args.model,
        "weights": str(Path(weights).resolve()) if weights else None,
        "input_size": list(dummy.shape[-2:]),
        "mode": args.mode,
        "method": args.method,
        "kwargs": kw,
    }
    save_quant(q, out, config)
    onnx = {}
    for fmt in export_formats(kw.get("target")):
        path = task.export(q, out / f"model_{fmt}.onnx", fmt)
        onnx[fmt] = {
            "path": str(path),
            "runs_in": "TIDL emulation (onnxruntime)" if fmt == "tidl" else "onnxruntime",
            **task.evaluate(path),
        }
    summary = {
        "task": task.name,
        "model": args.model,
        "target": kw.get("target"),
        "mode": args.mode,
        "float": float_metrics,
        "quantized": quant_metrics,
        "onnx": onnx,
    }
    path = write_summary(out, summary, t0)
    print(
        f"{args.model} {task.name} {args.mode.upper()}{for_chip(kw)}: float {_headline(float_metrics)} -> "
        f"quantized {_headline(quant_metrics)}"
    )
    for r in onnx.values():
        print(f"  {r['path']} ({r['runs_in']}): {_headline(r)}")
    print(f"  summary: {path}")
    return 0
