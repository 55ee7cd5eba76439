#!/usr/bin/env python
"""Statistics vs learned power-of-2 ranges (TQT) in QAT: the same recipe and seed, one table (issue 17).

For each model, two QAT runs that differ only in ``range_learning``:

* ``statistics``: ``QuantTrainModule(model, dummy)`` — PACT2 ranges tracked from the data, weights by the
  max rule; one SGD optimizer over all parameters.
* ``tqt``: ``QuantTrainModule(model, dummy, range_learning="tqt")`` — the same, plus learned log2 thresholds
  for every activation quantizer and weight tensor (initialised from the statistics of the first
  ``--init-batches`` batches), trained by their own Adam (``qmodel.range_parameters()``, lr ``--lr-th``, no
  weight decay, the same cosine schedule) — the optimizer the paper (and its Graffitist recipe) uses.

Recipe (both runs): ``--images`` training images (50 000 = one epoch) of CIFAR-10 with flip/crop
augmentation, batch 128, SGD nesterov momentum 0.9, weight decay 5e-4, cosine from the model's lr, BatchNorm
frozen from the start, ranges / thresholds frozen half-way (``freeze_quant_range``), seed 0; top-1 on the
10k JPEG test set.

Models: ``resnet20`` (``$XNNQ_DATA/weights/resnet20_cifar10jpg.pt``, lr 6e-3 as benchmarks/bench_qat.py),
``mobilenetv1`` (``xnnq.models.zoo.load_pretrained``, training form, per-tensor depthwise weights — the hard
case for power-of-2 per-tensor scales; lr 1e-3), and ``mosaic_detector`` / ``mosaic_segmenter`` when the zoo
has them (noted as absent otherwise).

Every finished run is kept in ``--out`` (JSON) and reused; a run in progress checkpoints every
``--ckpt-every`` steps and resumes bit-identically. Prints JSON; appends to benchmarks/RESULTS.md only with
``--record``.

    nice -n 10 python benchmarks/bench_tqt.py --threads 1 [--models resnet20] [--images 50000] [--record]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import xnnq  # noqa: E402
from xnnq import data  # noqa: E402
from xnnq.layers import freeze_quant_range  # noqa: E402
from xnnq.models import zoo  # noqa: E402
from xnnq.utils import freeze_bn  # noqa: E402

from common import emit  # noqa: E402

DUMMY = torch.zeros(1, 3, 32, 32)
MODEL_LR = {"resnet20": 6e-3, "mobilenetv1": 1e-3}
TASK_MODELS = ("mosaic_detector", "mosaic_segmenter")


def float_model(name: str) -> torch.nn.Module:
    if name == "resnet20":
        from xnnq.models.cifar_resnet import resnet20_cifar10

        return resnet20_cifar10(data.data_root() / "weights" / "resnet20_cifar10jpg.pt").eval()
    return zoo.load_pretrained(name).eval()


def wrap(name: str, mode: str, init_batches: int) -> xnnq.QuantTrainModule:
    kw = {} if mode == "statistics" else {"range_learning": mode, "range_init_batches": init_batches}
    return xnnq.QuantTrainModule(float_model(name), DUMMY, per_channel_q=False, **kw)


def exponent_changes(q: xnnq.QuantTrainModule) -> dict:
    """How many learned activation thresholds ended on another power of two than the statistics give."""
    moved, up, total = 0, 0, 0
    for p in q.quantizers().values():
        if p.learned_range is None or not p.observed:
            continue
        lo, hi = p.range_tensors()
        r = torch.maximum(-lo, hi)
        if p.cap is not None:
            r = r.clamp(max=p.cap)
        e_stat = math.ceil(math.log2(max(float(r), 2.0**-24)))
        e_learned = round(math.log2(float(p.learned_range.range(p.bits, p.resolved_signed(), p.log2_cap()))))
        total += 1
        moved += e_learned != e_stat
        up += e_learned > e_stat
    return {"activation_thresholds": total, "moved_from_statistics": moved, "moved_up": up}


def run(name: str, mode: str, args, Xtr, Ytr, Xte, Yte, out: Path) -> dict:
    lr = args.lr if args.lr else MODEL_LR[name]
    recipe = {
        "model": name,
        "mode": mode,
        "images": args.images,
        "batch_size": 128,
        "lr": lr,
        "seed": 0,
        "freeze_range_at": 0.5,
        "per_channel_q": False,
    }
    if mode != "statistics":
        recipe.update(lr_th=args.lr_th, init_batches=args.init_batches)
    key = hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]
    done, ckpt = out / f"{name}_{mode}_{key}.json", out / f"{name}_{mode}_{key}.ckpt.pt"
    if done.is_file():
        return json.loads(done.read_text())
    torch.manual_seed(0)
    q = wrap(name, mode, args.init_batches).train()
    freeze_bn(q)
    opt = torch.optim.SGD(q.non_range_parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    opt_th = torch.optim.Adam(q.range_parameters(), lr=args.lr_th) if q.range_parameters() else None
    steps = math.ceil(args.images / 128)
    start, seconds = 0, 0.0
    gen = torch.Generator().manual_seed(0)
    gen_state = gen.get_state()
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=True)
        q.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        if opt_th is not None:
            opt_th.load_state_dict(state["opt_th"])
        start, seconds = state["step"], state["seconds"]
        print(f"{name}/{mode}: resumed at step {start}", file=sys.stderr)
    gen.set_state(gen_state)
    t0 = time.perf_counter()
    it = data.batches(Xtr, Ytr, 128, shuffle=True, train_augment=True, generator=gen)
    for step in range(steps):
        xb, yb = next(it)
        if step < start:
            continue  # replay the data order and augmentation up to the checkpoint
        if step == steps // 2:
            freeze_quant_range(q)
        cos = 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr * cos
        opt.zero_grad(set_to_none=True)
        if opt_th is not None:
            for g in opt_th.param_groups:
                g["lr"] = args.lr_th * cos
            opt_th.zero_grad(set_to_none=True)
        loss = F.cross_entropy(q(xb), yb)
        loss.backward()
        opt.step()
        if opt_th is not None:
            opt_th.step()
        if (step + 1) % args.ckpt_every == 0 and step + 1 < steps:
            state = {
                "model": q.state_dict(),
                "opt": opt.state_dict(),
                "step": step + 1,
                "seconds": seconds + time.perf_counter() - t0,
            }
            if opt_th is not None:
                state["opt_th"] = opt_th.state_dict()
            torch.save(state, ckpt)
            print(f"{name}/{mode}: step {step + 1}/{steps} loss {loss.item():.3f}", file=sys.stderr)
    seconds += time.perf_counter() - t0
    q.eval()
    res = {"recipe": recipe, "top1": data.evaluate(q, Xte, Yte), "train_seconds": round(seconds, 1)}
    if mode != "statistics":
        res.update(exponent_changes(q))
    done.write_text(json.dumps(res, indent=1))
    ckpt.unlink(missing_ok=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet20", "mobilenetv1", *TASK_MODELS])
    ap.add_argument("--modes", nargs="+", default=["statistics", "tqt"])
    ap.add_argument("--images", type=int, default=50000, help="training images per run (50000 = one epoch)")
    ap.add_argument("--lr", type=float, default=0.0, help="weights' lr (0: the model's default)")
    ap.add_argument("--lr-th", type=float, default=1e-2, help="Adam lr of the learned log2 thresholds")
    ap.add_argument("--init-batches", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ckpt-every", type=int, default=50)
    ap.add_argument("--out", default="runs/bench_tqt")
    ap.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not data.cifar10_available():
        sys.exit(f"shared data not found under {data.data_root()} (set XNNQ_DATA)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    Xtr, Ytr = data.cifar10("train")
    Xte, Yte = data.cifar10("test")
    rows, notes = [], []
    for name in args.models:
        if name in TASK_MODELS and name not in zoo.MODELS:
            notes.append(
                f"{name}: not in xnnq.models.zoo on this checkout (zoo has {', '.join(sorted(zoo.MODELS))}); "
                "not measured"
            )
            continue
        if name in TASK_MODELS:
            notes.append(
                f"{name}: in the zoo but its task metric (mAP / mIoU) is not wired into this benchmark"
            )
            continue
        fp32 = data.evaluate(float_model(name), Xte, Yte)
        row = {"model": name, "fp32_top1": fp32}
        for mode in args.modes:
            r = run(name, mode, args, Xtr, Ytr, Xte, Yte, out)
            row[mode] = r
            print(json.dumps({name: {mode: r}}), file=sys.stderr)
        rows.append(row)
    res = {"rows": rows, "notes": notes, "args": {k: v for k, v in vars(args).items() if k != "record"}}
    lines = [
        "| model | FP32 | statistics (drop) | learned TQT (drop) | learned − statistics | thresholds moved |",
        "|---|---|---|---|---|---|",
    ]

    def cell(r: dict | None, fp32: float) -> str:
        return f"{r['top1']:.2f} ({fp32 - r['top1']:+.2f})" if r else "—"

    for row in rows:
        s, t = row.get("statistics"), row.get("tqt")
        diff = f"{t['top1'] - s['top1']:+.2f}" if s and t else "—"
        moved = f"{t['moved_from_statistics']}/{t['activation_thresholds']}" if t else "—"
        lines.append(
            f"| {row['model']} | {row['fp32_top1']:.2f} | {cell(s, row['fp32_top1'])} | "
            f"{cell(t, row['fp32_top1'])} | {diff} | {moved} |"
        )
    md = "\n".join(lines) + "\n\n" + "; ".join(notes)
    if args.record:
        emit("Learned vs statistics ranges (TQT)", res, md, record=True)
    else:
        print(json.dumps(res, indent=1))
        print(md)


if __name__ == "__main__":
    main()
