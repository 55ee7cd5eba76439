"""Train the Mosaic detector (xnnq.models.detector) on a COCO-format detection set; resumable.

    python scripts/train_detector.py --out runs/detector --epochs 14            # start (or --resume)
    python scripts/train_detector.py --out runs/detector --resume               # continue after a stop
    python scripts/train_detector.py --out runs/detector --resume --save        # copy the result to the zoo

Checkpoints every epoch (``<out>/last.pt``: model, optimizer, schedule position, history, CPU seconds),
evaluates COCO mAP on the val set every ``--eval-every`` epochs (and at the end). The backbone starts
from the CIFAR-10-train ResNet-20 weights (``$XNNQ_DATA/weights/resnet20_cifar10jpg.pt``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from xnnq.data import data_root
from xnnq.models.detector import mosaic_detector
from xnnq.tasks import detection
from xnnq.tasks.coco import load_coco
from xnnq.tasks.ssd import multibox_loss


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="folder with train/ and val/ (default $XNNQ_DATA/mosaic10)")
    ap.add_argument("--out", default="runs/detector")
    ap.add_argument("--epochs", type=int, default=14)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate (cosine, linear warmup)")
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=300, help="warmup steps")
    ap.add_argument("--eval-every", type=int, default=2)
    ap.add_argument("--eval-limit", type=int, default=None, help="val images for the periodic evaluation")
    ap.add_argument("--limit", type=int, default=None, help="train images (default all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument(
        "--save", action="store_true", help="copy the final weights + record to xnnq/models/checkpoints"
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    from tqdm.auto import tqdm

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    root = Path(args.data) if args.data else data_root() / "mosaic10"
    train_json, val_json = root / "train" / "instances.json", root / "val" / "instances.json"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ds = load_coco(train_json, limit=args.limit)
    model = mosaic_detector(
        data_root() / "weights" / "resnet20_cifar10jpg.pt",
        num_classes=len(ds.cat_ids),
        image_size=ds.images.shape[-1],
    ).to(args.device)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
    )
    steps_per_epoch = (len(ds) + args.batch_size - 1) // args.batch_size
    total = steps_per_epoch * args.epochs
    state = {"epoch": 0, "step": 0, "seconds": 0.0, "history": []}
    ckpt = out / "last.pt"
    if args.resume and ckpt.is_file():
        saved = torch.load(ckpt, map_location=args.device, weights_only=True)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        state = saved["state"]
        print(
            f"resumed at epoch {state['epoch']} (step {state['step']}, {state['seconds'] / 60:.1f} min so far)"
        )
    for epoch in range(state["epoch"], args.epochs):
        model.train()
        t0 = time.process_time()
        sums: dict[str, float] = {}
        bar = tqdm(
            detection.batches(
                train_json,
                batch_size=args.batch_size,
                train=True,
                seed=args.seed,
                epoch=epoch,
                limit=args.limit,
            ),
            total=steps_per_epoch,
            desc=f"epoch {epoch + 1}/{args.epochs}",
            mininterval=30,
        )
        for images, targets in bar:
            for g in opt.param_groups:
                g["lr"] = lr_at(state["step"], total, args.warmup, args.lr)
            loss, parts = multibox_loss(model.meta_arch, model(images.to(args.device)), targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            state["step"] += 1
            for k, v in {"loss": loss.detach(), **parts}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        state["epoch"] = epoch + 1
        state["seconds"] += time.process_time() - t0
        record = {
            "epoch": epoch + 1,
            **{k: round(v / steps_per_epoch, 4) for k, v in sums.items()},
            "cpu_min": round(state["seconds"] / 60, 1),
        }
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            t1 = time.process_time()
            record.update(detection.evaluate(model, val_json, limit=args.eval_limit, progress=False))
            state["seconds"] += time.process_time() - t1
        state["history"].append(record)
        print(json.dumps(record), flush=True)
        torch.save(
            {"model": model.state_dict(), "optimizer": opt.state_dict(), "state": state}, out / "last.tmp"
        )
        (out / "last.tmp").replace(ckpt)
    if args.save:
        final = state["history"][-1]
        if "mAP" not in final:
            final.update(detection.evaluate(model, val_json, progress=False))
        dest = Path(__file__).resolve().parents[1] / "xnnq" / "models" / "checkpoints"
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, dest / "mosaic_detector.pt")
        info = {
            "model": "mosaic_detector",
            "data": "Mosaic-10 train (6000 images), evaluated on val (1000)",
            "val_mAP": round(final["mAP"], 2),
            "val_mAP50": round(final["mAP50"], 2),
            "epochs": state["epoch"],
            "batch_size": args.batch_size,
            "optimizer": f"AdamW lr {args.lr} wd {args.weight_decay} cosine, {args.warmup} warmup steps",
            "cpu_hours": round(state["seconds"] / 3600, 2),
            "threads": args.threads,
            "backbone_init": "resnet20_cifar10jpg.pt (CIFAR-10 train)",
            "history": state["history"],
        }
        (dest / "mosaic_detector.json").write_text(json.dumps(info, indent=2) + "\n")
        print(f"saved {dest / 'mosaic_detector.pt'}")


if __name__ == "__main__":
    main()
