#!/usr/bin/env python
"""PTQ / QAT of re-parameterized CIFAR-10 networks: deploy form vs BN restore + CLE, and QARepVGG.

For each committed checkpoint (``xnnq/models/checkpoints``):

* FP32: the training form and its deploy form (``reparameterize``) on the 10k JPEG test set;
* PTQ deploy: ``QuantCalibrateModule(deploy, method="mse", constrain_weights=False)`` (8-bit, power-of-2
  per-tensor), calibrated on ``--calib-images`` training images in train mode; also with the engine's
  default ``constrain_weights=True`` (15σ weight clipping), which clips the identity-branch taps of
  fused kernels;
* PTQ BN restore + CLE: ``model_restore_bn`` (same calibration images) + ``cross_layer_equalize`` on the
  deploy form, then the same PTQ;
* QAT: ``QuantTrainModule`` on the restored + equalized deploy form, ``--qat-images`` training images
  (50k = 1 epoch), SGD lr ``--qat-lr`` cosine to 0, BatchNorm frozen, activation ranges frozen half-way.

Prints one JSON line per model and the result; ``--record`` also appends the table to
benchmarks/RESULTS.md. The QARepVGG row answers "QARepVGG PTQ without CLE" (its "PTQ deploy" column).

    nice -n 10 python benchmarks/bench_reparam.py [--models repvgg mobileone] [--qat-images 10000] [--record]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

import xnnq
from xnnq.data import Batches, batches, cifar10, cifar10_available, data_root, evaluate
from xnnq.models.reparam import reparameterize
from xnnq.models.zoo import MODELS, checkpoint_info, load_pretrained
from xnnq.recipes import qat_finetune
from xnnq.utils.bn_restore import model_restore_bn
from xnnq.utils.cle import cross_layer_equalize

from common import add_record_arg, emit

DUMMY = torch.zeros(1, 3, 32, 32)
GOALS = {
    "repvgg": ("ptq_restore_cle", 0.30),
    "mobileone": ("ptq_restore_cle", 0.50),
    "qarepvgg": ("ptq_deploy", 0.30),
}


def calibration_batches(n: int, batch_size: int = 100) -> list[torch.Tensor]:
    """The first ``n`` training images (all classes, no augmentation), normalized, in batches."""
    x, y = cifar10("train")
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:n]
    return [xb for xb, _ in batches(x[idx], y[idx], batch_size)]


def run_all(model: nn.Module, data: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for xb in data:
            model(xb)


def restore_and_equalize(deploy: nn.Module, calib: list[torch.Tensor]) -> nn.Module:
    """The deploy form with measured BatchNorms after each conv, then cross-layer equalized (+ HBA)."""
    model_restore_bn(deploy, lambda m: run_all(m, calib))
    return cross_layer_equalize(deploy, calib[0])


def ptq(model: nn.Module, calib: list[torch.Tensor], constrain_weights: bool = False) -> nn.Module:
    """Calibrated (PTQ) wrapper: forward passes in train mode, then eval."""
    qm = xnnq.QuantCalibrateModule(model, DUMMY, method="mse", constrain_weights=constrain_weights)
    qm.train()
    run_all(qm, calib)
    return qm.eval()


def qat(model: nn.Module, images: int, lr: float, batch_size: int = 128) -> nn.Module:
    """``images`` training images of QAT (:func:`xnnq.recipes.qat_finetune`: SGD Nesterov, no weight decay,
    cosine lr, BatchNorm frozen, activation ranges frozen half-way), then eval."""
    qm = xnnq.QuantTrainModule(model, DUMMY, constrain_weights=False)
    x, y = cifar10("train")
    train = Batches(
        x, y, batch_size, shuffle=True, train_augment=True, generator=torch.Generator().manual_seed(0)
    )
    return qat_finetune(
        qm, train, steps=math.ceil(images / batch_size), lr=lr, weight_decay=0.0, progress=False
    )


def bench_model(name: str, args, x_test, y_test, calib) -> dict:
    t0 = time.time()
    row: dict = {"model": name, "trained": checkpoint_info(name)}
    model = load_pretrained(name)

    def acc(m: nn.Module) -> float:
        return round(evaluate(m.eval(), x_test, y_test), 2)

    row["fp32"] = acc(model)
    deploy = reparameterize(model)
    row["fp32_deploy"] = acc(deploy)
    equalized = restore_and_equalize(reparameterize(model), calib)
    row["fp32_restore_cle"] = acc(equalized)
    row["calib_images"] = args.calib_images
    row["ptq_deploy_constrained"] = acc(ptq(deploy, calib, constrain_weights=True))
    row["ptq_deploy"] = acc(ptq(deploy, calib))
    row["ptq_restore_cle"] = acc(ptq(equalized, calib))
    if args.qat_images > 0:
        row["qat"] = acc(qat(equalized, args.qat_images, args.qat_lr))
        row["qat_images"], row["qat_lr"] = args.qat_images, args.qat_lr
    row["seconds"] = round(time.time() - t0)
    return row


def fmt(row: dict, key: str) -> str:
    v = row.get(key)
    if v is None:
        return "–"
    return f"{v:.2f} ({v - row['fp32']:+.2f})" if key != "fp32" else f"{v:.2f}"


def table(rows: list[dict], args) -> str:
    """The markdown table of ``rows`` with the goals and notes."""
    qat_images = sorted({r.get("qat_images", args.qat_images) for r in rows})
    qat_images = qat_images[0] if len(qat_images) == 1 else qat_images
    lines = [
        (
            f"10k JPEG test set, top-1 %. 8-bit power-of-2 per-tensor, PTQ method mse on "
            f"{args.calib_images} train images; QAT on {qat_images} train images "
            f"(lr {args.qat_lr}, BN frozen, "
            "ranges frozen half-way) of the restored + equalized deploy form. In brackets: change vs FP32.\n"
        ),
        (
            "| model | FP32 | PTQ deploy form | PTQ after BN restore + CLE | QAT | FP32 after restore + CLE "
            "| PTQ deploy, constrain_weights=True |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} (trained {r['trained']['epochs']} ep) | {fmt(r, 'fp32')} | "
            f"{fmt(r, 'ptq_deploy')} | "
            f"{fmt(r, 'ptq_restore_cle')} | {fmt(r, 'qat')} | {fmt(r, 'fp32_restore_cle')} | "
            f"{fmt(r, 'ptq_deploy_constrained')} |"
        )
    for r in rows:
        goal = GOALS.get(r["model"])
        if goal and r.get(goal[0]) is not None:
            drop = r["fp32"] - r[goal[0]]
            lines.append(
                f"\nGoal {r['model']}: {goal[0]} drop {drop:.2f} pp (goal <= {goal[1]:.2f}): "
                f"{'met' if drop <= goal[1] else 'NOT met'}."
            )
    lines.append(
        '\nThe qarepvgg row\'s "PTQ deploy form" column is QARepVGG PTQ without CLE. PTQ and QAT run with '
        "constrain_weights=False: the engine's default clipping of folded weights to 15σ clips the "
        "identity-branch centre taps of fused RepVGG / MobileOne kernels (up to ~50σ); the last column "
        "shows the deploy form with the default."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--models",
        nargs="+",
        default=["repvgg", "mobileone", "mobilenetv1", "qarepvgg"],
        choices=sorted(MODELS),
    )
    ap.add_argument("--calib-images", type=int, default=1000)
    ap.add_argument("--qat-images", type=int, default=50000, help="0 skips QAT; 50000 = one epoch")
    ap.add_argument("--qat-lr", type=float, default=1e-4)
    ap.add_argument("--eval-limit", type=int, default=None, help="evaluate on the first N test images only")
    ap.add_argument("--threads", type=int, default=1)
    add_record_arg(ap)
    ap.add_argument(
        "--rows-from",
        nargs="+",
        type=Path,
        default=None,
        help="do not run: write the table from the JSON rows printed by earlier runs (one model per run)",
    )
    args = ap.parse_args(argv)
    if args.rows_from:
        rows = [
            json.loads(line)
            for f in args.rows_from
            for line in f.read_text().splitlines()
            if line.startswith('{"model"')
        ]
    else:
        rows = run(args)
    record = args.record and not args.eval_limit  # the table states 10k test images
    emit(
        "bench_reparam: re-parameterized models, PTQ / CLE / QAT on CIFAR-10",
        {"rows": rows},
        table(rows, args),
        record=record,
    )
    return rows


def run(args) -> list[dict]:
    """One row per model of ``args.models``, each printed as a JSON line as soon as it is done."""
    if not cifar10_available():
        sys.exit(f"needs the shared CIFAR-10 data under {data_root()} (set XNNQ_DATA)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x_test, y_test = cifar10("test")
    if args.eval_limit:
        x_test, y_test = x_test[: args.eval_limit], y_test[: args.eval_limit]
    calib = calibration_batches(args.calib_images)
    rows = []
    for name in args.models:
        row = bench_model(name, args, x_test, y_test, calib)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
