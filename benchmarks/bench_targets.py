#!/usr/bin/env python
"""PTQ with the numerics of each TIDL target (xnnq/targets.py) on ResNet-20 (CIFAR-10) or the Mosaic-10 detector.

Models and data: benchmarks/workloads.py. Calibration: ``QuantCalibrateModule(method="mse")`` (with its
default bias correction), one per row, on ``--calib-images`` training images (ResNet-20: 1000 drawn with
``torch.manual_seed(0); torch.randperm(50000)``, batches of 100; the detector: the first 512 Mosaic-10 train
images, batches of 32). Rows:

* ``TDA4VM``: the chip's numerics — power-of-2, per-tensor, symmetric (MMAv1);
* ``AM69A`` (MMAv2; AM62A/AM67A/AM68A have the same numerics): its default — per-channel weights, free
  (non-power-of-2) scales — and the two halves of it (per-channel power-of-2; per-tensor free scales).

Each row is exported with the row's target (``export_onnx`` / ``xnnq.tasks.detection.export``, QDQ) and
the file run in onnxruntime; the TIDL importer-rule violations and the compile options are read from the
export's JSON.

* ``--model resnet20``: top-1 of the PyTorch simulation on the first ``--test-images`` (all 10k) JPEG test
  images; onnxruntime (on a batch-500 twin of the export, faster) on the first ``--ort-images``: its top-1
  and its agreement with the simulation.
* ``--model mosaic_detector``: COCO mAP@[.5:.95] and mAP@.5 (``xnnq.tasks.detection.evaluate``: caffe-SSD
  decode + NMS, pycocotools) of the simulation and of onnxruntime on the first ``--eval-images`` (all 1000)
  val images. About 3 CPU-min per row at 1 thread, ~14 CPU-min in all with the FP32 row.

Prints JSON; ``--record`` appends a table to benchmarks/RESULTS.md.

    python benchmarks/bench_targets.py [--model resnet20|mosaic_detector] [--threads 1]
        [--test-images N | --eval-images N] [--ort-images N] [--resume F] [--record]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import workloads

from xnnq.data import batches, cifar10, evaluate
from xnnq.export import export_onnx
from xnnq.export.check import OnnxRunner
from xnnq.export.options import read_options
from xnnq.tasks import detection

from common import add_record_arg, emit

MODELS = ("resnet20", "mosaic_detector")
DEFAULTS = {"resnet20": (1000, 10000), "mosaic_detector": (512, 1000)}  # calibration, test images
ROWS = [
    ("TDA4VM", "power-of-2, per-tensor (chip default)", {}),
    ("AM69A", "free scales, per-channel weights (chip default)", {}),
    (
        "AM69A",
        "power-of-2, per-channel weights",
        {"power2_weight_range": True, "power2_activation_range": True},
    ),
    ("AM69A", "free scales, per-tensor weights", {"per_channel_q": False}),
]


@torch.no_grad()
def ort_top1(path: Path, q, x: torch.Tensor, y: torch.Tensor, threads: int) -> dict:
    runner = OnnxRunner(path, threads=threads)
    correct = agree = 0
    for xb, yb in batches(x, y, 500):
        ort = runner(xb).argmax(1)
        correct += int((ort == yb).sum())
        agree += int((ort == q(xb).argmax(1)).sum())
    return {"ort_acc": 100.0 * correct / len(y), "ort_sim_top1_agreement": agree / len(y)}


class Task:
    """What differs between the models: the metric of the simulation and of the exported file."""

    def __init__(self, w: workloads.Workload, args):
        self.w, self.args = w, args
        self.model = w.float_model()
        if w.name == "resnet20":
            self.x, self.y = cifar10("test", args.test_images)
            self.ort_n = min(args.ort_images or len(self.y), len(self.y))

    def evaluate(self, net) -> dict:
        """The metric of a PyTorch model (float or simulation)."""
        if self.w.name == "resnet20":
            return {"acc": evaluate(net, self.x, self.y)}
        t0 = time.process_time()
        res = detection.evaluate(
            net,
            self.w.val_json,
            limit=self.args.test_images,
            meta_arch=self.model.meta_arch,
            threads=self.args.threads,
            progress=False,
        )
        return {"mAP": res["mAP"], "mAP50": res["mAP50"], "eval_cpu_s": time.process_time() - t0}

    def export_and_run(self, q, out: Path) -> tuple[dict, dict]:
        """Export ``q`` for its target (QDQ); the export's JSON and the metric of the file in onnxruntime."""
        stem = f"{q.target}_{len(list(out.iterdir()))}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the violations are read from the JSON
            if self.w.name == "resnet20":
                path = export_onnx(q, self.w.dummy(), out / f"{stem}.onnx", format="qdq").path
                twin = export_onnx(q, self.w.dummy(500), out / f"{stem}_b500.onnx", format="qdq").path
            else:
                path = detection.export(q, out / f"{stem}.onnx", format="qdq", meta_arch=self.model.meta_arch)
        opts = read_options(path)
        if self.w.name == "resnet20":
            n = self.ort_n
            return opts, ort_top1(twin, q, self.x[:n], self.y[:n], self.args.threads)
        res = detection.evaluate(
            path, self.w.val_json, limit=self.args.test_images, threads=self.args.threads, progress=False
        )
        return opts, {"ort_mAP": res["mAP"], "ort_mAP50": res["mAP50"]}


def run_row(task: Task, calib, target: str, label: str, kw: dict, out: Path) -> dict:
    q, calib_s = workloads.ptq(task.w, calib, task.model, method="mse", target=target, **kw)
    row = {"target": target, "numerics": label, "settings": kw, **task.evaluate(q), "calib_cpu_s": calib_s}
    opts, ort = task.export_and_run(q, out)
    row.update(
        flow=opts.get("flow"),
        runtime_options=opts["runtime_options"],
        fixes=opts.get("fixes", []),
        violations=sorted({f"{v['severity']}:{v['rule']}" for v in opts.get("violations", [])}),
        **ort,
    )
    return row


def table(result: dict) -> str:
    detector = result.get("model") == "mosaic_detector"
    if detector:
        fp = result["fp32"]
        head = (
            f"Mosaic-10 SSD detector (`mosaic_detector`), PTQ mse ({result['calib_images']} calibration images, "
            f"bias correction), COCO mAP@[.5:.95] / mAP@.5 on the first {result['test_images']} val images, "
            f"PyTorch simulation and onnxruntime (QDQ). FP32 {fp['mAP']:.2f} / {fp['mAP50']:.2f}."
        )
        cols = "| target | numerics | scale type | mAP (sim) | mAP@.5 (sim) | mAP drop | onnxruntime mAP | onnxruntime mAP@.5 |"
    else:
        fp = result["fp32_acc"]
        head = (
            f"ResNet-20 CIFAR-10, PTQ mse ({result['calib_images']} calibration images, bias correction), top-1 on "
            f"{result['test_images']} test images (simulation) and {result['ort_images']} (onnxruntime QDQ). "
            f"FP32 {fp:.2f} %."
        )
        cols = (
            "| target | numerics | scale type | top-1 (sim) | drop | onnxruntime top-1 | ort/sim agreement |"
        )
    lines = [head, "", cols, "|---" * (cols.count("|") - 1) + "|"]
    for r in result["rows"]:
        cells = [
            r["target"],
            r["numerics"],
            str(r["runtime_options"]["advanced_options:quantization_scale_type"]),
        ]
        if detector:
            cells += [
                f"{r['mAP']:.2f}",
                f"{r['mAP50']:.2f}",
                f"{fp['mAP'] - r['mAP']:+.2f}",
                f"{r['ort_mAP']:.2f}",
                f"{r['ort_mAP50']:.2f}",
            ]
        else:
            cells += [
                f"{r['acc']:.2f}",
                f"{fp - r['acc']:+.2f} pp",
                f"{r['ort_acc']:.2f}",
                f"{100 * r['ort_sim_top1_agreement']:.2f} %",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "Importer-rule violations (every row): "
        + (", ".join(sorted({v for r in result["rows"] for v in r["violations"]})) or "none")
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=MODELS, default="resnet20")
    ap.add_argument("--calib-images", type=int, default=None, help="default 1000 (ResNet-20), 512 (detector)")
    ap.add_argument(
        "--test-images",
        "--eval-images",
        dest="test_images",
        type=int,
        default=None,
        help="test / val images (default all: 10000 CIFAR-10, 1000 Mosaic-10)",
    )
    ap.add_argument(
        "--ort-images", type=int, default=None, help="ResNet-20: onnxruntime images (default all)"
    )
    ap.add_argument("--threads", type=int, default=1)
    add_record_arg(ap)
    ap.add_argument(
        "--resume", help="JSON file of finished rows: written after each row, finished rows skipped"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    w = workloads.get(args.model)
    if (why := w.missing()) is not None:
        sys.exit(why)
    calib_n, test_n = DEFAULTS[w.name]
    args.calib_images = args.calib_images or calib_n
    args.test_images = args.test_images or test_n
    task = Task(w, args)
    calib = w.calibration_batches(args.calib_images)
    result: dict = {"model": w.name, "calib_images": args.calib_images, "rows": []}
    if w.name == "resnet20":
        result.update(
            test_images=len(task.y), ort_images=task.ort_n, fp32_acc=task.evaluate(task.model)["acc"]
        )
    else:
        fp = task.evaluate(task.model)
        result.update(test_images=args.test_images, fp32={k: fp[k] for k in ("mAP", "mAP50")})
    done = json.loads(Path(args.resume).read_text()) if args.resume and Path(args.resume).is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for target, label, kw in ROWS:
            key = f"{target}: {label}" if w.name == "resnet20" else f"{w.name} | {target}: {label}"
            if key not in done:
                done[key] = run_row(task, calib, target, label, kw, Path(tmp))
                if args.resume:
                    Path(args.resume).write_text(json.dumps(done, indent=1))
            row = done[key]
            metric = ("acc", "ort_acc") if w.name == "resnet20" else ("mAP", "mAP50", "ort_mAP", "ort_mAP50")
            print(json.dumps({k: row[k] for k in ("target", "numerics", *metric)}), flush=True)
            result["rows"].append(row)
    emit(
        "bench_targets" if w.name == "resnet20" else f"bench_targets ({w.name})",
        result,
        table(result),
        record=args.record,
    )
    print(table(result))


if __name__ == "__main__":
    main()
