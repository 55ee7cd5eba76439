#!/usr/bin/env python
"""QAT of an SSD detector for TIDL, with its object-detection export (ONNX + options + meta-arch prototxt).

    load_pretrained("mosaic_detector") → QuantTrainModule → xnnq.recipes.qat_finetune (SSD loss) → evaluate
    → detection.export(format="tidl" | "qdq") → evaluate the ONNX files (onnxruntime / TIDL emulation)

    python examples/detection_qat.py --train-images 1024 --eval-images 200 --out out/detector
    python examples/detection_qat.py --target AM69A   # that chip's numerics; it takes the QDQ format only

Any COCO-format set works (``--data`` with ``train/`` and ``val/``, each ``images/`` + ``instances.json``);
the default is Mosaic-10 under ``$XNNQ_DATA``. A different number of classes needs a detector trained for it
(``scripts/train_detector.py --data ...``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import xnnq
from xnnq.data import data_root
from xnnq.models.zoo import load_pretrained
from xnnq.targets import export_formats
from xnnq.tasks import detection
from xnnq.tasks.ssd import multibox_loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="folder with train/ and val/ (default $XNNQ_DATA/mosaic10)")
    ap.add_argument("--train-images", type=int, default=1024, help="6000 = one Mosaic-10 epoch")
    ap.add_argument("--eval-images", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", default="out/detector")
    ap.add_argument(
        "--target", default=None, help="TIDL chip (TDA4VM, AM68A, AM69A, AM62A, AM67A); default none"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    root = Path(args.data) if args.data else data_root() / "mosaic10"
    train, val = root / "train" / "instances.json", root / "val" / "instances.json"

    model = load_pretrained("mosaic_detector")  # float SSD core, eval mode, model.meta_arch
    meta = model.meta_arch
    print("float   ", detection.evaluate(model, val, limit=args.eval_images))

    qmodel = xnnq.QuantTrainModule(
        model, torch.zeros(1, 3, meta.in_height, meta.in_width), target=args.target
    )
    train_batches = detection.batches(train, batch_size=args.batch_size, train=True, limit=args.train_images)
    qmodel = xnnq.recipes.qat_finetune(  # BN frozen, ranges frozen at half, cosine; returns eval mode
        qmodel,
        train_batches,
        epochs=1,
        optimizer=torch.optim.AdamW(qmodel.parameters(), lr=args.lr, weight_decay=0),
        loss_fn=lambda outputs, targets: multibox_loss(meta, outputs, targets)[0],
    )
    print("QAT     ", detection.evaluate(qmodel, val, limit=args.eval_images, meta_arch=meta))

    out = Path(args.out)
    for fmt in export_formats(args.target):  # the chip's formats (both without a target)
        path = detection.export(qmodel, out / f"mosaic_detector_{fmt}.onnx", format=fmt, meta_arch=meta)
        print(
            f"{fmt:8s}",
            detection.evaluate(path, val, limit=args.eval_images),
            "<-",
            path,
            path.with_suffix(".prototxt").name,
        )


if __name__ == "__main__":
    main()
