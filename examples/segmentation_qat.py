#!/usr/bin/env python
"""QAT of a segmentation net for TIDL, exported as TI's segmentation models are (ArgMax head).

    load_pretrained("mosaic_segmenter") → QuantTrainModule → xnnq.recipes.qat_finetune (cross-entropy,
    ignore_index) → evaluate (mIoU) → segmentation.export(format="tidl" | "qdq", argmax=True)
    → evaluate the ONNX files (onnxruntime / TIDL emulation)

    python examples/segmentation_qat.py --train-images 1024 --eval-images 200 --out out/segmenter

Any VOC-style set works (``--data`` with ``train/`` and ``val/``, each ``images/*.jpg`` + ``masks/*.png``
of the same stems, 255 = ignore); the default is Mosaic-10 under ``$XNNQ_DATA``. Another number of
classes needs a net trained for it (``scripts/train_segmenter.py --data ...``).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F

import xnnq
from xnnq.data import data_root
from xnnq.models.zoo import load_pretrained
from xnnq.targets import export_formats
from xnnq.tasks import segmentation as seg


class Crops:
    """Re-iterable augmented training batches (scale, flip, then one random ``crop`` window per batch)."""

    def __init__(self, root: Path, batch_size: int, crop: int, limit: int):
        self.root, self.batch_size, self.crop, self.limit = root, batch_size, crop, limit
        self.g = torch.Generator().manual_seed(0)

    def __len__(self) -> int:
        return math.ceil(self.limit / self.batch_size)

    def __iter__(self):
        it = seg.batches(
            self.root, "train", batch_size=self.batch_size, limit=self.limit, train=True, generator=self.g
        )
        for x, m in it:
            yield seg.random_crop(x, m, self.crop, self.g)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="folder with train/ and val/ (default $XNNQ_DATA/mosaic10)")
    ap.add_argument("--train-images", type=int, default=1024, help="6000 = one Mosaic-10 epoch")
    ap.add_argument("--eval-images", type=int, default=200)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--out", default="out/segmenter")
    ap.add_argument(
        "--target", default=None, help="TIDL chip (TDA4VM, AM68A, AM69A, AM62A, AM67A); default none"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    root = Path(args.data) if args.data else data_root() / "mosaic10"
    out = Path(args.out)

    model = load_pretrained("mosaic_segmenter")
    dummy = torch.zeros(1, 3, 128, 128)
    print("float   ", seg.evaluate(model, root, "val", limit=args.eval_images, progress=True))

    qmodel = xnnq.QuantTrainModule(model, dummy, target=args.target)
    opt = torch.optim.AdamW(qmodel.parameters(), lr=args.lr, weight_decay=1e-4)
    xnnq.recipes.qat_finetune(
        qmodel,
        Crops(root, args.batch_size, args.crop, args.train_images),
        epochs=1,
        optimizer=opt,
        loss_fn=lambda y, m: F.cross_entropy(y, m, ignore_index=255),
    )
    print("QAT     ", seg.evaluate(qmodel, root, "val", limit=args.eval_images, progress=True))

    for fmt in export_formats(args.target):  # the chip's formats (both without a target)
        path = seg.export(qmodel, out / f"mosaic_segmenter_{fmt}.onnx", format=fmt)  # + .tidl.json beside it
        how = "TIDL emulation" if fmt == "tidl" else "onnxruntime"
        print(
            f"{fmt:8s}",
            seg.evaluate(path, root, "val", limit=args.eval_images, progress=True),
            f"({how}, {path})",
        )


if __name__ == "__main__":
    main()
