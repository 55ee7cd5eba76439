#!/usr/bin/env python
"""PTQ of ResNet-20 on CIFAR-10 with the numerics of each TIDL target (xnnq/targets.py).

Model: ``$XNNQ_DATA/weights/resnet20_cifar10jpg.pt``. Calibration: ``QuantCalibrateModule(method="mse")``
(with its default bias correction) on ``--calib-images`` (1000) training images, drawn with
``torch.manual_seed(0); torch.randperm(50000)``, batches of 100. Test: the first ``--test-images`` (all
10k) JPEG test images, top-1 of the PyTorch simulation. Rows:

* ``TDA4VM``: the chip's numerics — power-of-2, per-tensor, symmetric (MMAv1);
* ``AM69A`` (MMAv2; AM62A/AM67A/AM68A have the same numerics): its default — per-channel weights, free
  (non-power-of-2) scales — and the two halves of it (per-channel power-of-2; per-tensor free scales).

Each row is exported with ``export_onnx(target=...)`` and its QDQ file run in onnxruntime on the first
``--ort-images`` test images: top-1 of onnxruntime and its agreement with the simulation, the TIDL
importer-rule violations and the compile options. Prints JSON; ``--record`` appends a table to
benchmarks/RESULTS.md.

    python benchmarks/bench_targets.py [--threads 1] [--test-images 10000] [--ort-images 10000] [--resume F] [--record]
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
from xnnq.calibrate import QuantCalibrateModule
from xnnq.data import batches, cifar10, cifar10_available, data_root, evaluate
from xnnq.export import export_onnx
from xnnq.export.check import OnnxRunner
from xnnq.models.cifar_resnet import resnet20_cifar10

from common import emit

DUMMY = torch.zeros(1, 3, 32, 32)
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


def calibration_batches(n: int, batch_size: int = 100) -> list[torch.Tensor]:
    x, y = cifar10("train")
    torch.manual_seed(0)
    idx = torch.randperm(len(y))[:n]
    return [xb for xb, _ in batches(x[idx], y[idx], batch_size)]


@torch.no_grad()
def ort_row(path: Path, q, x: torch.Tensor, y: torch.Tensor) -> dict:
    runner = OnnxRunner(path, threads=1)
    correct = agree = 0
    for xb, yb in batches(x, y, 500):
        ort = runner(xb).argmax(1)
        correct += int((ort == yb).sum())
        agree += int((ort == q(xb).argmax(1)).sum())
    return {"ort_acc": 100.0 * correct / len(y), "ort_sim_top1_agreement": agree / len(y)}


def run_row(model, calib, test, ort_test, target: str, label: str, kw: dict, out: Path) -> dict:
    t0 = time.process_time()
    q = QuantCalibrateModule(model, DUMMY, method="mse", target=target, **kw)
    q.train()
    with torch.no_grad():
        for xb in calib:
            q(xb)
    q.eval()
    calib_s = time.process_time() - t0
    acc = evaluate(q, *test)
    stem = f"{target}_{len(list(out.iterdir()))}"
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        res = export_onnx(q, DUMMY, out / f"{stem}.onnx", format="qdq")  # the file for TIDL
        batched = export_onnx(q, DUMMY.expand(500, -1, -1, -1), out / f"{stem}_b500.onnx", format="qdq")
    opts = json.loads(res.options_path.read_text())
    row = {
        "target": target,
        "numerics": label,
        "settings": kw,
        "acc": acc,
        "calib_cpu_s": calib_s,
        "flow": res.flow,
        "runtime_options": opts["runtime_options"],
        "fixes": res.fixes,
        "violations": sorted({f"{v.severity}:{v.rule}" for v in res.violations}),
    }
    row.update(ort_row(batched.path, q, *ort_test))  # the same graph with a static batch of 500 (faster)
    return row


def table(result: dict) -> str:
    fp = result["fp32_acc"]
    head = (
        f"ResNet-20 CIFAR-10, PTQ mse ({result['calib_images']} calibration images, bias correction), top-1 on "
        f"{result['test_images']} test images (simulation) and {result['ort_images']} (onnxruntime QDQ). "
        f"FP32 {fp:.2f} %."
    )
    lines = [
        head,
        "",
        "| target | numerics | scale type | top-1 (sim) | drop | onnxruntime top-1 | ort/sim agreement |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['target']} | {r['numerics']} | {r['runtime_options']['advanced_options:quantization_scale_type']}"
            f" | {r['acc']:.2f} | {fp - r['acc']:+.2f} pp | {r['ort_acc']:.2f} | "
            f"{100 * r['ort_sim_top1_agreement']:.2f} % |"
        )
    lines.append("")
    lines.append(
        "Importer-rule violations (every row): "
        + ", ".join(sorted({v for r in result["rows"] for v in r["violations"]}))
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calib-images", type=int, default=1000)
    ap.add_argument("--test-images", type=int, default=10000)
    ap.add_argument("--ort-images", type=int, default=10000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--record", action="store_true", help="append the table and JSON to benchmarks/RESULTS.md"
    )
    ap.add_argument(
        "--resume", help="JSON file of finished rows: written after each row, finished rows skipped"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not cifar10_available():
        sys.exit(f"CIFAR-10 not found under {data_root()} (set XNNQ_DATA)")
    model = resnet20_cifar10(data_root() / "weights" / "resnet20_cifar10jpg.pt").eval()
    calib = calibration_batches(args.calib_images)
    x, y = cifar10("test", args.test_images)
    result = {
        "calib_images": args.calib_images,
        "test_images": len(y),
        "ort_images": min(args.ort_images, len(y)),
        "fp32_acc": evaluate(model, x, y),
        "rows": [],
    }
    done = json.loads(Path(args.resume).read_text()) if args.resume and Path(args.resume).is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for target, label, kw in ROWS:
            key = f"{target}: {label}"
            if key not in done:
                done[key] = run_row(
                    model,
                    calib,
                    (x, y),
                    (x[: args.ort_images], y[: args.ort_images]),
                    target,
                    label,
                    kw,
                    Path(tmp),
                )
                if args.resume:
                    Path(args.resume).write_text(json.dumps(done, indent=1))
            row = done[key]
            print(json.dumps({k: row[k] for k in ("target", "numerics", "acc", "ort_acc")}), flush=True)
            result["rows"].append(row)
    print(table(result))
    emit("bench_targets", result, table(result), record=args.record)


if __name__ == "__main__":
    main()
