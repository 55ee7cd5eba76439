#!/usr/bin/env python
"""Train :class:`xnnq.models.segmenter.MosaicSegmenter` on Mosaic-10 (CPU friendly, resumable).

The ResNet-20 body starts from the shared CIFAR-10-train checkpoint (``$XNNQ_DATA/weights/
resnet20_cifar10jpg.pt``; nothing trained on CIFAR-10 test), the decoder from scratch. AdamW with a
one-cycle learning rate computed from the step (warm-up, cosine decay), cross-entropy with
``ignore_index`` (the padding of the scale/crop augmentation). Every epoch writes ``<run-dir>/last.pt``;
``--resume`` continues from it. The val mIoU is logged every ``--eval-every`` epochs and at the end;
with ``--save`` the state dict and its record go to ``xnnq/models/checkpoints/mosaic_segmenter.pt|.json``.

    nohup python scripts/train_segmenter.py --epochs 14 --save > runs/seg.log 2>&1 &
    python scripts/train_segmenter.py --epochs 14 --save --resume   # after an interruption
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from xnnq.data import data_root
from xnnq.models.segmenter import mosaic_segmenter
from xnnq.models.zoo import CHECKPOINTS
from xnnq.tasks import segmentation as seg


def lr_at(step: int, total: int, peak: float, warmup: float = 0.05) -> float:
    """One-cycle: linear from peak/20 to peak over ``warmup`` of the steps, then cosine to ~0."""
    w = max(1, int(total * warmup))
    if step < w:
        return peak * (0.05 + 0.95 * step / w)
    return peak * 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, total - w)))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            (decay if name == "weight" and isinstance(module, nn.Conv2d) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help="default $XNNQ_DATA/mosaic10")
    ap.add_argument("--epochs", type=int, default=14)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW)")
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument(
        "--backbone", type=Path, default=None, help="default $XNNQ_DATA/weights/resnet20_cifar10jpg.pt"
    )
    ap.add_argument("--run-dir", type=Path, default=Path("runs/mosaic_segmenter"))
    ap.add_argument("--eval-every", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="train on the first N images (smoke runs)")
    ap.add_argument("--stem-stride", type=int, default=2, choices=(1, 2))
    ap.add_argument(
        "--crop", type=int, default=0, help="train on random crops of this size (0: whole images)"
    )
    ap.add_argument(
        "--init",
        type=Path,
        default=None,
        help="a MosaicSegmenter state dict to start the decoder from (the body comes from --backbone)",
    )
    ap.add_argument("--resume", action="store_true", help="continue from <run-dir>/last.pt")
    ap.add_argument("--save", action="store_true", help="write the committed checkpoint + json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = args.data or data_root() / "mosaic10"
    backbone = args.backbone or data_root() / "weights" / "resnet20_cifar10jpg.pt"
    args.run_dir.mkdir(parents=True, exist_ok=True)

    model = mosaic_segmenter(stem_stride=args.stem_stride)
    if args.init is not None:
        init = torch.load(args.init, map_location="cpu", weights_only=True)
        body = ("stem_", "layer1.", "layer2.", "layer3.")
        model.load_state_dict({k: v for k, v in init.items() if not k.startswith(body)}, strict=False)
    model.load_backbone(backbone)
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr)
    n_train = seg.load_split(data, "train", args.limit)[0].shape[0]
    steps_per_epoch = math.ceil(n_train / args.batch_size)
    total = steps_per_epoch * args.epochs
    start_epoch, seconds, history = 0, 0.0, []
    last = args.run_dir / "last.pt"
    if args.resume and last.is_file():
        ck = torch.load(last, map_location="cpu", weights_only=True)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        start_epoch, seconds, history = int(ck["epoch"]), float(ck["seconds"]), json.loads(ck["history"])
        print(f"resumed from {last} at epoch {start_epoch}", flush=True)

    for epoch in range(start_epoch, args.epochs):
        model.train()
        g = torch.Generator().manual_seed(args.seed * 1000 + epoch)
        t0 = time.time()
        run_loss = torch.zeros(())
        it = seg.batches(data, "train", batch_size=args.batch_size, limit=args.limit, train=True, generator=g)
        bar = tqdm(it, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{args.epochs}", mininterval=30)
        for i, (x, m) in enumerate(bar):
            if args.crop:
                x, m = seg.random_crop(x, m, args.crop, g)
            for group in opt.param_groups:
                group["lr"] = lr_at(epoch * steps_per_epoch + i, total, args.lr)
            loss = F.cross_entropy(model(x), m, ignore_index=seg.IGNORE_INDEX)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            run_loss += loss.detach()
        seconds += time.time() - t0
        rec = {"epoch": epoch + 1, "loss": float(run_loss) / steps_per_epoch, "train_seconds": round(seconds)}
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            rec.update(seg.evaluate(model, data, "val", progress=True))
        history.append(rec)
        print(json.dumps(rec), flush=True)
        torch.save(
            {
                "model": model.state_dict(),
                "opt": opt.state_dict(),
                "epoch": epoch + 1,
                "seconds": seconds,
                "history": json.dumps(history),
            },
            last,
        )

    model.eval()
    final = seg.evaluate(model, data, "val", progress=True)
    result = {
        "model": "mosaic_segmenter",
        "val_mIoU": round(final["mIoU"], 2),
        "val_pixel_acc": round(final["pixel_acc"], 2),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "optimizer": "AdamW, one-cycle (5% warm-up, cosine)",
        "augmentation": "scale 0.75-1.25, crop/pad to 128 (ignore 255), hflip"
        + (f", random {args.crop}x{args.crop} crop per batch" if args.crop else ""),
        "stem_stride": args.stem_stride,
        "init": str(args.init) if args.init else None,
        "backbone": "ResNet-20 from weights/resnet20_cifar10jpg.pt (CIFAR-10 train only)",
        "train_seconds": round(seconds),
        "threads": args.threads,
        "history": history,
    }
    (args.run_dir / "result.json").write_text(json.dumps(result, indent=1))
    if args.save:
        torch.save(model.state_dict(), CHECKPOINTS / "mosaic_segmenter.pt")
        (CHECKPOINTS / "mosaic_segmenter.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "history"}), flush=True)
    return result


if __name__ == "__main__":
    main()
