#!/usr/bin/env python
"""Statistics vs learned power-of-2 ranges (TQT) in QAT: the same recipe and seed, one table (issue 17).

For each model, two QAT runs that differ only in ``range_learning``:

* ``statistics``: ``QuantTrainModule(model, dummy)`` — PACT2 ranges tracked from the data, weights by the
  max rule; one optimizer over all parameters.
* ``tqt``: ``QuantTrainModule(model, dummy, range_learning="tqt")`` — the same, plus learned log2 thresholds
  for every activation quantizer and weight tensor (initialised from the statistics of the first
  ``--init-batches`` batches, at the centre of their octave; with ``--anchor statistics``, the default, moving
  with the statistics' power of two after that, ``--anchor init`` not; taking another power of two once
  ``--hysteresis`` octaves past the edge, default the library's 0.25), trained by their own Adam
  (``qmodel.range_parameters()``, lr ``--lr-th``, no weight decay, the same cosine schedule) — the optimizer
  the paper (and its Graffitist recipe) uses.

Both runs go through ``xnnq.recipes.qat_finetune`` (BatchNorm frozen from the start, ranges / thresholds
frozen half-way, cosine to 0, 8-bit power-of-2 per-tensor, ``--seed``, default 0); per model the task's data, loss and
metric:

* ``resnet20`` (``$XNNQ_DATA/weights/resnet20_cifar10jpg.pt``, lr 6e-3 as benchmarks/bench_qat.py) and
  ``mobilenetv1`` (``xnnq.models.zoo.load_pretrained``, training form, per-tensor depthwise weights — the
  hard case for power-of-2 per-tensor scales; lr 1e-3): ``--images`` CIFAR-10 training images (50 000 =
  one epoch) with flip/crop augmentation, batch 128, SGD Nesterov momentum 0.9, weight decay 5e-4,
  cross-entropy; top-1 on the 10k JPEG test set.
* ``repvgg`` (only when named: ``--models repvgg``): RepVGG's deploy form with its BatchNorms restored and
  cross-layer equalized (``bench_reparam.restore_and_equalize``), the CIFAR recipe above at lr 1e-4 (the QAT lr
  of benchmarks/bench_reparam.py): a model whose statistics QAT stays short of FP32.
* ``mosaic_detector``: the QAT of benchmarks/bench_detection.py (``qat``: SSD multibox loss, AdamW lr 1e-4,
  no weight decay, batch 32, Mosaic-10 train with the detection augmentation); COCO mAP@[.5:.95] and
  mAP@.5 on Mosaic-10 val (``xnnq.tasks.detection.evaluate``).
* ``mosaic_segmenter``: the QAT of benchmarks/bench_segmentation.py (``qat``: cross-entropy with
  ``ignore_index``, AdamW lr 5e-5, weight decay 1e-4, batch 32 of 64x64 random crops of the augmented
  Mosaic-10 train images); mIoU on Mosaic-10 val (``xnnq.tasks.segmentation.evaluate``).

The Mosaic-10 runs train on the first ``--task-images`` train images (default all 6000: one epoch, as the
two task benchmarks; more than 6000 makes several epochs) and evaluate on the first ``--eval-images`` val
images (default all 1000; CIFAR-10: test images, default all 10 000). The table gives the FP32 metric of
the checkpoint, each mode's QAT metric and drop, learned − statistics, the goals of the issue (learned ≥
statistics on every model; on the detector a learned-range QAT drop ≤ 0.3 mAP points), how many
activation thresholds ended on another power of 2 than the statistics give and how many weight thresholds
ended below the max rule's power of 2 (their upper bound).

Every finished run (and every FP32 metric) is kept in ``--out`` (JSON) and reused; a run in progress
checkpoints every ``--ckpt-every`` steps and resumes bit-identically (``qat_finetune(checkpoint=...)``).
Times are CPU seconds (process time). Prints the JSON and the table; appends them to
benchmarks/RESULTS.md only with ``--record``. ``--seeds N ...`` runs (or reuses) each seed in ``<out>/seed<N>`` and
prints instead the summary across them: per model, the statistics metric's mean and range, learned − statistics
per seed, its mean and standard error, and how many seeds are below, equal (within 0.005) and above.

    nice -n 10 python benchmarks/bench_tqt.py --threads 1 [--models mosaic_detector] [--record]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import xnnq
from xnnq import data
from xnnq.models import zoo
from xnnq.tasks import detection
from xnnq.tasks import segmentation as seg

import bench_detection
import bench_segmentation
from common import emit, qat_finetune_timed, qat_optimizers, range_learning_kwargs

DUMMY = torch.zeros(1, 3, 32, 32)
CIFAR_MODELS = ("resnet20", "mobilenetv1")
EXTRA_MODELS = ("repvgg",)  # not run by default: a model whose statistics QAT stays short of FP32
CIFAR_LIKE = CIFAR_MODELS + EXTRA_MODELS  # trained and evaluated on CIFAR-10
TASK_MODELS = ("mosaic_detector", "mosaic_segmenter")
MODEL_LR = {
    "resnet20": 6e-3,
    "mobilenetv1": 1e-3,
    "repvgg": 1e-4,  # benchmarks/bench_reparam.py's QAT lr
    "mosaic_detector": bench_detection.QAT_LR,
    "mosaic_segmenter": bench_segmentation.QAT_LR,
}
METRICS = {"mosaic_detector": ("mAP", "mAP50"), "mosaic_segmenter": ("mIoU",)}  # shown; default top1
GOAL_DETECTOR_DROP = 0.3  # mAP points, learned ranges (issue 17)


def mosaic_root() -> Path:
    return data.data_root() / "mosaic10"


def metrics_of(name: str) -> tuple[str, ...]:
    return METRICS.get(name, ("top1",))


def float_model(name: str) -> torch.nn.Module:
    if name == "resnet20":
        from xnnq.models.cifar_resnet import resnet20_cifar10

        return resnet20_cifar10(data.data_root() / "weights" / "resnet20_cifar10jpg.pt").eval()
    if name == "repvgg":  # deploy form, BatchNorms restored and cross-layer equalized (bench_reparam.py)
        import bench_reparam

        from xnnq.models.reparam import reparameterize

        deploy = reparameterize(zoo.load_pretrained(name).eval())
        return bench_reparam.restore_and_equalize(deploy, bench_reparam.calibration_batches(1000)).eval()
    return zoo.load_pretrained(name).eval()


class Cifar:
    """CIFAR-10, decoded on first use (the task models never pay for it)."""

    def __init__(self):
        self._splits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __getitem__(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split not in self._splits:
            self._splits[split] = data.cifar10(split)
        return self._splits[split]


def evaluate(name: str, model: torch.nn.Module, args, cifar: Cifar) -> dict[str, float]:
    """The task metric(s) of ``model`` (0-100) on the first ``--eval-images`` val / test images."""
    model.eval()
    if name == "mosaic_detector":
        val = mosaic_root() / "val" / "instances.json"
        meta = float_model(name).meta_arch  # the wrapper does not carry it
        res = detection.evaluate(
            model, val, limit=args.eval_images, meta_arch=meta, threads=args.threads, progress=False
        )
    elif name == "mosaic_segmenter":
        res = seg.evaluate(model, mosaic_root(), "val", limit=args.eval_images)
    else:
        x, y = cifar["test"]
        n = args.eval_images or len(y)
        with torch.no_grad():
            res = {"top1": data.evaluate(model, x[:n], y[:n])}
    return {k: round(v, 3) for k, v in res.items()}


def exponent_changes(q: xnnq.QuantTrainModule) -> dict:
    """How many learned activation thresholds ended on another power of two than the statistics give."""
    moved, up, total = 0, 0, 0
    for p in q.quantizers().values():
        if p.learned_range is None or not p.observed:
            continue
        r = p.statistics_range()
        e_stat = math.ceil(math.log2(max(float(r), 2.0**-24)))
        learned = p.learned_range.range(p.bits, p.resolved_signed(), p.log2_cap(), r)
        e_learned = round(math.log2(float(learned)))
        total += 1
        moved += e_learned != e_stat
        up += e_learned > e_stat
    w_moved, w_total = 0, 0
    for spot in q.plan.weights:  # weights: the learned power of 2 vs the max rule's on the final weights
        layer = q.module.get_submodule(spot.name)
        if layer.learned_range is None:
            continue
        bn = q.module.get_submodule(spot.bn) if spot.bn else None
        with torch.no_grad():
            _, r, log2_rule = layer._rule_range(layer.folded_weight_bias(bn)[0])
            learned = layer.learned_range.range(layer.weight_bits, True, log2_rule, r)
        w_total += learned.numel()
        w_moved += int((torch.log2(learned) != log2_rule).sum())
    return {
        "activation_thresholds": total,
        "moved_from_statistics": moved,
        "moved_up": up,
        "weight_thresholds": w_total,
        "weight_moved_below_max_rule": w_moved,
    }


def task_images(args) -> tuple[int | None, float]:
    """``(limit, epochs)`` of a Mosaic-10 run: the first ``--task-images`` train images once, or all of
    them for ``--task-images / len(train)`` epochs when more are asked for."""
    if args.task_images is None:
        return None, 1.0
    images = mosaic_root() / "train" / "images"
    n = sum(1 for f in images.iterdir() if f.suffix.lower() in seg.IMAGE_EXTENSIONS)
    return (args.task_images, 1.0) if args.task_images <= n else (None, args.task_images / n)


def qat(name: str, mode: str, args, recipe: dict, ckpt: Path | None, cifar: Cifar, trace: list | None = None):
    """One QAT run through ``xnnq.recipes.qat_finetune``; returns ``(qmodel, steps, cpu_seconds)``; ``trace``
    (a list) gets the thresholds' per-step octaves and offsets (``common.TracedAdam``)."""
    range_kw = {
        "range_learning": mode,
        "init_batches": args.init_batches,
        "anchor": args.anchor,
        "hysteresis": args.hysteresis,
        "lr_th": args.lr_th,
        "trace": trace,
    }
    ckpt_kw = {"checkpoint": ckpt, "checkpoint_every": args.ckpt_every}
    torch.manual_seed(args.seed)
    if name == "mosaic_detector":
        limit, epochs = task_images(args)
        q, info = bench_detection.qat(
            float_model(name),
            mosaic_root() / "train" / "instances.json",
            epochs=epochs,
            lr=recipe["lr"],
            batch_size=recipe["batch_size"],
            limit=limit,
            **range_kw,
            **ckpt_kw,
        )
        return q, info["steps"], info["cpu_s"]
    if name == "mosaic_segmenter":
        limit, epochs = task_images(args)
        batches = bench_segmentation.TrainCrops(
            mosaic_root(), recipe["batch_size"], recipe["crop"], seed=args.seed, limit=limit
        )
        return bench_segmentation.qat(float_model(name), batches, epochs, recipe["lr"], **range_kw, **ckpt_kw)
    q = xnnq.QuantTrainModule(
        float_model(name),
        DUMMY,
        per_channel_q=False,
        **range_learning_kwargs(mode, args.init_batches, args.anchor, args.hysteresis),
    )
    lr = recipe["lr"]

    def sgd(params):
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)

    train = data.Batches(
        *cifar["train"],
        128,
        shuffle=True,
        train_augment=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    steps = math.ceil(args.images / 128)
    q, cpu_s = qat_finetune_timed(
        q,
        train,
        steps=steps,
        optimizer=qat_optimizers(q, sgd, args.lr_th, trace),
        desc=f"{name}/{mode}",
        **ckpt_kw,
    )
    return q, steps, cpu_s


def recipe_of(name: str, mode: str, args) -> dict:
    recipe = {
        "model": name,
        "mode": mode,
        "lr": args.lr or MODEL_LR[name],
        "seed": args.seed,
        "freeze_range_at": 0.5,
        "per_channel_q": False,
        "eval_images": args.eval_images,
    }
    if name == "mosaic_detector":
        recipe.update(task_images=args.task_images, batch_size=bench_detection.BATCH_SIZE, optimizer="AdamW")
    elif name == "mosaic_segmenter":
        recipe.update(
            task_images=args.task_images,
            batch_size=bench_segmentation.BATCH_SIZE,
            crop=bench_segmentation.CROP,
            optimizer="AdamW",
        )
    else:
        recipe.update(images=args.images, batch_size=128, optimizer="SGD")
    if mode != "statistics":
        recipe.update(lr_th=args.lr_th, init_batches=args.init_batches, init="octave-centre")
        if args.anchor != "init":  # recipes before range_anchor existed had the "init" behaviour
            recipe.update(anchor=args.anchor)
        if args.hysteresis is not None:  # recipes before range_hysteresis existed: the paper's ceil (0)
            recipe.update(hysteresis=args.hysteresis)
    return recipe


def key_of(obj: dict) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def fp32(name: str, args, out: Path, cifar: Cifar) -> dict:
    """The checkpoint's float metric(s), kept in ``out``."""
    done = out / f"{name}_fp32_{key_of({'model': name, 'eval_images': args.eval_images})}.json"
    if done.is_file():
        return json.loads(done.read_text())
    t0 = time.process_time()
    res = evaluate(name, float_model(name), args, cifar)
    res["eval_cpu_s"] = round(time.process_time() - t0, 1)
    done.write_text(json.dumps(res, indent=1))
    return res


def trace_summary(trace: list[dict], near: float = 0.1) -> dict[str, dict]:
    """Per threshold that left its initial octave or came within ``near`` of an edge (offset ±1/2) during a traced
    run: its extreme offsets, the steps whose forward used another octave, the step it first did, the octave
    and offset it ended with (per-channel thresholds: over their channels)."""
    out = {}
    for name in trace[0] if trace else []:
        us = [v for t in trace for v in _flat(t[name]["u"])]
        off = [i for i, t in enumerate(trace) if any(k != 0 for k in _flat(t[name]["k"]))]
        closest = min(abs(abs(u) - 0.5) for u in us)
        if off or closest < near:
            last = trace[-1][name]
            out[name] = {
                "max_offset": round(max(us), 3),
                "min_offset": round(min(us), 3),
                "steps_off_initial_octave": len(off),
                "first_step_off": off[0] if off else None,
                "final_octave": max(_flat(last["k"]), key=abs),
                "final_offset": round(max(_flat(last["u"]), key=abs), 3),
            }
    return out


def _flat(v) -> list[float]:
    return v if isinstance(v, list) else [v]


def run(name: str, mode: str, args, out: Path, cifar: Cifar) -> dict:
    recipe = recipe_of(name, mode, args)
    stem = f"{name}_{mode}_{key_of(recipe)}"
    done, ckpt = out / f"{stem}.json", out / f"{stem}.ckpt.pt"
    trace = [] if args.trace and mode != "statistics" else None
    if done.is_file() and trace is None:
        return json.loads(done.read_text())
    if trace is not None:  # a traced run starts afresh (the steps before a resume would be missing)
        ckpt = None
    elif ckpt.is_file():
        print(f"{name}/{mode}: resuming from {ckpt}", file=sys.stderr)
    q, steps, cpu_s = qat(name, mode, args, recipe, ckpt, cifar, trace)
    if trace is not None:
        summary = trace_summary(trace)
        (out / f"{stem}.trace.json").write_text(json.dumps({"summary": summary, "steps": trace}))
        print(json.dumps({name: {"trace": summary}}, indent=1), file=sys.stderr, flush=True)
    t0 = time.process_time()
    res = {
        "recipe": recipe,
        "steps": steps,
        **evaluate(name, q, args, cifar),
        "train_cpu_s": round(cpu_s, 1),
        "eval_cpu_s": round(time.process_time() - t0, 1),
    }
    if mode != "statistics":
        res.update(exponent_changes(q))
    if done.is_file():  # a traced re-run: the run on record stays; say whether the metrics came out the same
        kept = json.loads(done.read_text())
        same = all(kept.get(m) == res.get(m) for m in metrics_of(name))
        print(
            f"{name}/{mode}: traced re-run {'equals' if same else 'DIFFERS FROM'} the run on record",
            file=sys.stderr,
        )
        return kept
    done.write_text(json.dumps(res, indent=1))
    return res


def cell(r: dict | None, fp: dict, metric: str) -> str:
    return f"{r[metric]:.2f} ({fp[metric] - r[metric]:+.2f})" if r else "—"


def table(rows: list[dict], notes: list[str], args) -> str:
    lines = [
        "| model | metric | FP32 | statistics (drop) | learned TQT (drop) | learned − statistics "
        "| goal | thresholds moved (activations; weights) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        name, fp, s, t = row["model"], row["fp32"], row.get("statistics"), row.get("tqt")
        for i, metric in enumerate(metrics_of(name)):
            goals = []
            if s and t and i == 0:
                goals.append(f"learned ≥ statistics: {'met' if t[metric] >= s[metric] else 'NOT met'}")
            if t and name == "mosaic_detector" and metric == "mAP":
                ok = fp[metric] - t[metric] <= GOAL_DETECTOR_DROP
                goals.append(f"learned drop ≤ {GOAL_DETECTOR_DROP}: {'met' if ok else 'NOT met'}")
            diff = f"{t[metric] - s[metric]:+.2f}" if s and t else "—"
            moved = ""
            if t and i == 0:
                moved = f"{t['moved_from_statistics']}/{t['activation_thresholds']}"
                if "weight_thresholds" in t:
                    moved += f"; weights {t['weight_moved_below_max_rule']}/{t['weight_thresholds']}"
            lines.append(
                f"| {name} | {metric} | {fp[metric]:.2f} | {cell(s, fp, metric)} | {cell(t, fp, metric)} "
                f"| {diff} | {'; '.join(goals)} | {moved} |"
            )
    runs = [r for row in rows for r in (row.get("statistics"), row.get("tqt")) if r]
    cpu = sum(r["train_cpu_s"] + r["eval_cpu_s"] for r in runs)
    names = {row["model"] for row in rows}
    sizes = []
    if names & set(CIFAR_LIKE):
        sizes.append(f"CIFAR-10 {args.images} training images")
    if names & set(TASK_MODELS):
        sizes.append(f"Mosaic-10 {args.task_images or 'all 6000'} training images")
    lines += [
        "",
        f"Same recipe and seed ({args.seed}) for both modes (the script's docstring): {', '.join(sizes)}; metric on "
        f"{args.eval_images or 'all'} val / test images. Learned thresholds: Adam lr {args.lr_th}, "
        f"initialised over {args.init_batches} batch(es), anchor `{args.anchor}`, hysteresis {_hysteresis(args)}. "
        f"{args.threads} thread(s); QAT + eval of these runs "
        f"{cpu / 60:.1f} CPU-min.",
    ]
    if notes:
        lines += ["", "; ".join(notes)]
    return "\n".join(lines)


def _hysteresis(args) -> str:
    """The learned thresholds' margin as the tables print it."""
    return "the library's default" if args.hysteresis is None else f"{args.hysteresis:g} octave"


def seeds_summary(per_seed: dict[int, list[dict]], args) -> tuple[dict, str]:
    """Across seeds, per model: the statistics metric (mean, range) and learned − statistics (per seed, mean,
    standard error, seeds below / equal / above: a difference under 0.005 counts as equal, as the per-seed
    tables print it 0.00), on the model's first metric."""
    seeds = sorted(per_seed)
    out: dict[str, Any] = {}
    lines = [
        f"Seeds {', '.join(map(str, seeds))}, learned − statistics on each model's first metric (anchor "
        f"`{args.anchor}`, hysteresis {_hysteresis(args)}, the recipe of the per-seed runs):",
        "",
        "| model | metric | FP32 | statistics: mean (min–max) | learned − statistics per seed | mean (standard "
        "error) | below / equal / above |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in args.models:
        rows = {s: next((r for r in per_seed[s] if r["model"] == name), None) for s in seeds}
        rows = {s: r for s, r in rows.items() if r and r.get("statistics") and r.get("tqt")}
        if not rows:
            continue
        metric = metrics_of(name)[0]
        stat = [r["statistics"][metric] for r in rows.values()]
        diff = [r["tqt"][metric] - r["statistics"][metric] for r in rows.values()]
        n = len(diff)
        mean = statistics.mean(diff)
        se = statistics.stdev(diff) / n**0.5 if n > 1 else float("nan")
        counts = (
            sum(d < -0.005 for d in diff),
            sum(abs(d) <= 0.005 for d in diff),
            sum(d > 0.005 for d in diff),
        )
        fp = next(iter(rows.values()))["fp32"][metric]
        out[name] = {
            "metric": metric,
            "seeds": list(rows),
            "statistics": stat,
            "learned_minus_statistics": [round(d, 3) for d in diff],
            "mean": round(mean, 3),
            "standard_error": round(se, 3),
            "below_equal_above": counts,
        }
        lines.append(
            f"| {name} | {metric} | {fp:.2f} | {statistics.mean(stat):.2f} ({min(stat):.2f}–{max(stat):.2f}) | "
            f"{' / '.join(f'{d:+.2f}' for d in diff)} | {mean:+.3f} ({se:.3f}) | {' / '.join(map(str, counts))} |"
        )
    return out, "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=[*CIFAR_MODELS, *TASK_MODELS])
    ap.add_argument("--modes", nargs="+", default=["statistics", "tqt"])
    ap.add_argument(
        "--images", type=int, default=50000, help="CIFAR-10 training images per run (50000 = 1 epoch)"
    )
    ap.add_argument(
        "--task-images",
        type=int,
        default=None,
        help="Mosaic-10 training images per run (default: all 6000 = one epoch; more: several epochs)",
    )
    ap.add_argument(
        "--eval-images",
        type=int,
        default=None,
        help="first N val / test images for the metric (default: all; 1000 Mosaic-10, 10000 CIFAR-10)",
    )
    ap.add_argument("--lr", type=float, default=0.0, help="weights' lr (0: the model's default)")
    ap.add_argument("--lr-th", type=float, default=1e-2, help="Adam lr of the learned log2 thresholds")
    ap.add_argument("--init-batches", type=int, default=20)
    ap.add_argument(
        "--anchor",
        choices=["statistics", "init"],
        default="statistics",
        help="range_anchor of the learned thresholds (init: the paper's, fixed after initialisation)",
    )
    ap.add_argument(
        "--hysteresis",
        type=float,
        default=None,
        help="range_hysteresis of the learned thresholds, octaves (default: the library's)",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--seed",
        type=int,
        default=0,
        help="torch's seed and the CIFAR-10 / segmentation data order (the detector's data order is fixed)",
    )
    ap.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help="run (or reuse) each seed in <out>/seed<N>, then print the summary across seeds (mean, standard error)",
    )
    ap.add_argument("--ckpt-every", type=int, default=50, help="steps between checkpoints of a run")
    ap.add_argument(
        "--trace",
        action="store_true",
        help="re-run the learned runs (not reused, no checkpoints) recording every threshold's octave and offset "
        "per step in <out>/<run>.trace.json; prints the thresholds that left their octave or neared an edge",
    )
    ap.add_argument("--out", default="runs/bench_tqt")
    ap.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    unknown = set(args.models) - {*CIFAR_LIKE, *TASK_MODELS}
    if unknown:
        ap.error(f"unknown model(s) {sorted(unknown)}: choose from {[*CIFAR_LIKE, *TASK_MODELS]}")
    if set(args.models) & set(CIFAR_LIKE) and not data.cifar10_available():
        sys.exit(f"CIFAR-10 not found under {data.data_root()} (set XNNQ_DATA)")
    if set(args.models) & set(TASK_MODELS) and not (mosaic_root() / "val" / "instances.json").is_file():
        sys.exit(f"Mosaic-10 not found under {mosaic_root()} (set XNNQ_DATA)")
    cifar = Cifar()
    if args.seeds:
        per_seed = {}
        for seed in args.seeds:
            args.seed = seed
            per_seed[seed] = measure(args, Path(args.out) / f"seed{seed}", cifar)[0]
        summary, md = seeds_summary(per_seed, args)
        res = {"summary": summary, "args": {k: v for k, v in vars(args).items() if k != "record"}}
        emit("Learned vs statistics ranges (TQT), across seeds", res, md, record=args.record)
        print(md)
        return
    rows, notes = measure(args, Path(args.out), cifar)
    res = {"rows": rows, "notes": notes, "args": {k: v for k, v in vars(args).items() if k != "record"}}
    md = table(rows, notes, args)
    emit("Learned vs statistics ranges (TQT)", res, md, record=args.record)
    print(md)


def measure(args, out: Path, cifar: Cifar) -> tuple[list[dict], list[str]]:
    """Every model's FP32 metric and its runs in ``args.modes`` with ``args.seed``, kept in (and reused from)
    ``out``; returns the rows and notes of :func:`table`."""
    out.mkdir(parents=True, exist_ok=True)
    rows, notes = [], []
    for name in args.models:
        if name in TASK_MODELS and name not in zoo.MODELS:
            notes.append(f"{name}: not in xnnq.models.zoo on this checkout; not measured")
            continue
        row = {"model": name, "fp32": fp32(name, args, out, cifar)}
        if name in TASK_MODELS:
            row["checkpoint"] = zoo.checkpoint_info(name)
        for mode in args.modes:
            row[mode] = run(name, mode, args, out, cifar)
            print(json.dumps({name: {mode: row[mode]}}), file=sys.stderr, flush=True)
        rows.append(row)
    return rows, notes


if __name__ == "__main__":
    main()
