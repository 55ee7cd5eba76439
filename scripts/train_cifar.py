#!/usr/bin/env python
"""Train one of xnnq's small CIFAR-10 networks from scratch on the shared JPEG data (CPU friendly).

SGD with Nesterov momentum, a one-cycle learning rate (linear warm-up, cosine decay, computed from the
step so that nothing but the optimizer needs saving), random crop + flip, label smoothing 0.1 and plain
weight decay on conv / linear weights. Every epoch writes ``<run-dir>/last.pt``; rerunning the same
command resumes from it. At the end the 10k test accuracy is printed and written to
``<run-dir>/result.json``; with ``--save`` the state dict and its record also go to
``xnnq/models/checkpoints/<model>.pt|.json``.

    nohup nice -n 10 python scripts/train_cifar.py --model repvgg --epochs 6 --save > runs/repvgg.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from xnnq.data import batches, cifar10, evaluate
from xnnq.models.zoo import CHECKPOINTS, MODELS, get_model


def lr_at(step: int, total: int, peak: float, warmup: float = 0.15) -> float:
    """One-cycle: linear from peak/20 to peak over ``warmup`` of the steps, then cosine to ~0."""
    w = max(1, int(total * warmup))
    if step < w:
        return peak * (0.05 + 0.95 * step / w)
    t = (step - w) / max(1, total - w)
    return peak * 0.5 * (1 + math.cos(math.pi * t))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv / linear weights only (not on BatchNorm parameters or biases)."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            is_weight = name == "weight" and isinstance(module, (nn.Conv2d, nn.Linear))
            (decay if is_weight else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, choices=sorted(MODELS))
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.2, help="peak learning rate")
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--run-dir", type=Path, default=None, help="default runs/<model>")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--limit", type=int, default=None, help="use only the first N training images (smoke runs)"
    )
    ap.add_argument("--save", action="store_true", help="write xnnq/models/checkpoints/<model>.pt and .json")
    ap.add_argument(
        "--init",
        type=Path,
        default=None,
        help="continue from this state dict (e.g. the committed checkpoint) with a fresh schedule; "
        "its .json record, if present, adds its epochs and seconds to the new record",
    )
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    run_dir = args.run_dir or Path("runs") / args.model
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    # NCHW, not channels_last: torch 2.14.1's CPU backward of a channels-last 1x1 stride-2 conv with 3 input
    # channels (the RepVGG / QARepVGG / MobileOne stems) corrupts the heap on AVX2-only x86 (seen here)
    model = get_model(args.model)
    opt = torch.optim.SGD(param_groups(model, args.weight_decay), lr=args.lr, momentum=0.9, nesterov=True)
    gen = torch.Generator().manual_seed(args.seed)
    start_epoch, seconds = 0, 0.0
    prior = {"epochs": 0, "seconds": 0}
    if args.init is not None:
        model.load_state_dict(torch.load(args.init, map_location="cpu", weights_only=True))
        record_path = args.init.with_suffix(".json")
        if record_path.is_file():
            prior = json.loads(record_path.read_text())
        print(f"initialised from {args.init} ({prior['epochs']} epochs before)", flush=True)
    last = run_dir / "last.pt"
    if last.is_file():
        state = torch.load(last, map_location="cpu", weights_only=True)
        if state["model_name"] != args.model or state["epochs"] != args.epochs:
            raise ValueError(
                f"{last} is a run of {state['model_name']} for {state['epochs']} epochs; "
                f"use another --run-dir for --model {args.model} --epochs {args.epochs}"
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        start_epoch, seconds = state["epoch"], state["seconds"]
        print(f"resumed {last} at epoch {start_epoch}", flush=True)

    x_train, y_train = cifar10("train", limit=args.limit)
    x_test, y_test = cifar10("test")
    steps_per_epoch = math.ceil(len(y_train) / args.batch_size)
    total = steps_per_epoch * args.epochs
    for epoch in range(start_epoch, args.epochs):
        t0 = time.time()
        model.train()
        loss_sum = torch.zeros(())
        it = batches(x_train, y_train, args.batch_size, shuffle=True, train_augment=True, generator=gen)
        bar = tqdm(
            it, total=steps_per_epoch, desc=f"{args.model} epoch {epoch + 1}/{args.epochs}", mininterval=30
        )
        for i, (x, y) in enumerate(bar):
            for g in opt.param_groups:
                g["lr"] = lr_at(epoch * steps_per_epoch + i, total, args.lr)
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach()
        seconds += time.time() - t0
        model.eval()
        acc_2k = evaluate(model, x_test[:2000], y_test[:2000])
        print(
            f"epoch {epoch + 1}: loss {float(loss_sum) / steps_per_epoch:.4f} test[:2000] {acc_2k:.2f}% "
            f"({seconds:.0f} s)",
            flush=True,
        )
        torch.save(
            {
                "model_name": args.model,
                "epochs": args.epochs,
                "epoch": epoch + 1,
                "seconds": seconds,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "generator": gen.get_state(),
            },
            last,
        )

    model.eval()
    acc = evaluate(model, x_test, y_test)
    record = {
        "model": args.model,
        "test_acc": round(acc, 2),
        "test_set": "cifar10/test (10k JPEG)",
        "epochs": prior["epochs"] + args.epochs,
        "seconds": round(prior["seconds"] + seconds),
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "train_images": len(y_train),
        "threads": args.threads,
    }
    if args.init is not None:
        record["schedule"] = (
            f"{prior['epochs']} epochs, then {args.epochs} more from that checkpoint "
            f"with a new one-cycle at peak lr {args.lr}"
        )
    print(f"final test accuracy {args.model}: {acc:.2f}%", flush=True)
    (run_dir / "result.json").write_text(json.dumps(record, indent=2) + "\n")
    if args.save:
        CHECKPOINTS.mkdir(parents=True, exist_ok=True)
        torch.save(
            {k: v.contiguous() for k, v in model.state_dict().items()}, CHECKPOINTS / f"{args.model}.pt"
        )
        (CHECKPOINTS / f"{args.model}.json").write_text(json.dumps(record, indent=2) + "\n")
        print(f"saved {CHECKPOINTS / (args.model + '.pt')}", flush=True)
    return record


if __name__ == "__main__":
    main()
