"""QAT on the CIFAR-10 ResNet-20 (issue 2 acceptance 3): accuracy after 1 epoch, range-only accuracy, step
time.

    python benchmarks/bench_qat.py [--epochs 1] [--lr 1e-4] [--threads N] [--save runs/qat_resnet20.pt]
        [--record]

QAT is :func:`xnnq.recipes.qat_finetune` (SGD Nesterov, weight decay 5e-4, cosine to 0, batch 128, random
crop + flip). Prints JSON; ``--record`` also appends a row to benchmarks/RESULTS.md. Needs the shared data
($XNNQ_DATA, default ../shared/data).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import xnnq
from xnnq import data
from xnnq.models.cifar_resnet import resnet20_cifar10
from xnnq.recipes import qat_finetune

from common import add_record_arg, emit


def step_time(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer) -> float:
    t = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    return time.perf_counter() - t


def time_steps(weights, Xtr, Ytr, batch_size, n, gen, dummy) -> dict:
    """Float vs QAT train step on one batch, interleaved in one process; medians (after warm-up/compile)."""
    x, y = next(data.batches(Xtr, Ytr, batch_size, train_augment=True, generator=gen))
    fm = resnet20_cifar10(weights).train()
    qm = xnnq.QuantTrainModule(resnet20_cifar10(weights), dummy).train()
    of = torch.optim.SGD(fm.parameters(), lr=1e-4, momentum=0.9)
    oq = torch.optim.SGD(qm.parameters(), lr=1e-4, momentum=0.9)
    for _ in range(3):
        step_time(fm, x, y, of), step_time(qm, x, y, oq)
    tf, tq = [], []
    for _ in range(n):
        tf.append(step_time(fm, x, y, of))
        tq.append(step_time(qm, x, y, oq))
    return {
        "float_step_ms": round(statistics.median(tf) * 1e3, 1),
        "qat_step_ms": round(statistics.median(tq) * 1e3, 1),
        "qat_over_float_step": round(statistics.median(tq) / statistics.median(tf), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=6e-3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--freeze-bn-at", type=float, default=0.0, help="fraction of training when BN is frozen")
    ap.add_argument(
        "--freeze-range-at", type=float, default=0.5, help="fraction of training when ranges freeze"
    )
    ap.add_argument("--timing-steps", type=int, default=12)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    ap.add_argument("--save", default="runs/qat_resnet20.pt")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--timing-only", action="store_true", help="measure only the step-time ratio")
    add_record_arg(ap)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not data.cifar10_available():
        sys.exit(f"shared data not found under {data.data_root()} (set XNNQ_DATA)")
    weights = data.data_root() / "weights" / "resnet20_cifar10jpg.pt"
    Xtr, Ytr = data.cifar10("train")
    Xte, Yte = data.cifar10("test")
    dummy = torch.randn(1, 3, 32, 32)
    res: dict = {"recipe": {k: v for k, v in vars(args).items() if k not in ("save", "record")}}

    if args.timing_only:
        gen = torch.Generator().manual_seed(0)
        res.update(time_steps(weights, Xtr, Ytr, args.batch_size, args.timing_steps, gen, dummy))
        md = (
            f"| QAT/float train-step time (batch {args.batch_size}, median of {args.timing_steps}) "
            f"| threads |\n"
            f"|---|---|\n| {res['qat_over_float_step']}× "
            f"({res['qat_step_ms']} / {res['float_step_ms']} ms) | "
            f"{torch.get_num_threads()} |"
        )
        emit("QAT step time ResNet-20", res, md, record=args.record)
        return
    fp = resnet20_cifar10(weights).eval()
    res["fp32_top1"] = data.evaluate(fp, Xte, Yte)

    # ---- range only: 1000 train images, BN frozen, no optimizer
    torch.manual_seed(0)
    idx = torch.randperm(len(Ytr))[:1000]
    t0 = time.perf_counter()
    q = xnnq.QuantTrainModule(fp, dummy).train()
    xnnq.utils.freeze_bn(q)
    with torch.no_grad():
        for xb, _ in data.batches(Xtr[idx], Ytr[idx], 100):
            q(xb)
    res["range_only_seconds"] = round(time.perf_counter() - t0, 2)
    q.eval()
    res["range_only_top1"] = data.evaluate(q, Xte, Yte)

    # ---- QAT
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    q = xnnq.QuantTrainModule(resnet20_cifar10(weights), dummy)
    train = data.Batches(Xtr, Ytr, args.batch_size, shuffle=True, train_augment=True, generator=gen)
    t0 = time.perf_counter()
    q = qat_finetune(
        q,
        train,
        epochs=args.epochs,
        lr=args.lr,
        freeze_bn_at=args.freeze_bn_at,
        freeze_range_at=args.freeze_range_at,
    )
    res["qat_seconds"] = round(time.perf_counter() - t0, 1)
    res["qat_top1"] = data.evaluate(q, Xte, Yte)
    Path(args.save).parent.mkdir(parents=True, exist_ok=True)
    torch.save(q.state_dict(), args.save)
    # the state dict round-trips into an eval-only wrapper of the same float model
    qt = xnnq.QuantTestModule(resnet20_cifar10(), dummy)
    qt.load_state_dict(torch.load(args.save, weights_only=True))
    res["qat_top1_reloaded_in_QuantTestModule"] = data.evaluate(qt, Xte, Yte)
    res["qat_drop_pp"] = round(res["fp32_top1"] - res["qat_top1"], 2)
    res["range_only_drop_pp"] = round(res["fp32_top1"] - res["range_only_top1"], 2)

    # ---- step time: float vs QAT train step, batch 128, interleaved, median
    if not args.skip_timing:
        res.update(time_steps(weights, Xtr, Ytr, args.batch_size, args.timing_steps, gen, dummy))

    md = (
        "| FP32 top-1 | range-only top-1 (drop) | QAT 1 epoch top-1 (drop) | QAT/float step time "
        "|\n|---|---|---|---|\n"
        f"| {res['fp32_top1']:.2f} | {res['range_only_top1']:.2f} ({res['range_only_drop_pp']:+.2f} pp) | "
        f"{res['qat_top1']:.2f} ({res['qat_drop_pp']:+.2f} pp) | "
        f"{res.get('qat_over_float_step', 'n/a')}× "
        f"({res.get('qat_step_ms', '-')} / {res.get('float_step_ms', '-')} ms) |\n"
        f"\nRecipe: {res['recipe']}; drops are FP32 − quantized (negative = gain). "
        f"10k CIFAR-10 JPEG test images."
    )
    emit("QAT ResNet-20 CIFAR-10", res, md, record=args.record)


if __name__ == "__main__":
    main()
