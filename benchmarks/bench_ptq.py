#!/usr/bin/env python
"""Post-training quantization of ResNet-20 on CIFAR-10: xnnq calibration methods vs torch.ao FX and
onnxruntime.

Model: ``weights/resnet20_cifar10jpg.pt``. Calibration: ``--calib-images`` (1000) training images, drawn
with ``torch.manual_seed(0); torch.randperm(50000)``, batches of 100, no augmentation. Test: the first
``--test-images`` (all 10k) JPEG test images. Every row uses the same model, images and test set.

* xnnq: ``QuantCalibrateModule`` for every method (max, percentile 99.99, mse, entropy) with 8-bit
  power-of-2 per-tensor weights and activations (TIDL), without and with bias correction, and with
  bias correction + MSE weight clipping. ``calib s`` is the CPU time (``time.process_time``: the machine
  is shared, wall time is in the JSON) of the calibration forward passes plus ``eval()`` (range choice,
  weight clipping, bias correction); ``finalize s`` is the ``eval()`` part; the float model's forward
  over the same images is timed the same way in the same run for comparison.
* torch.ao FX PTQ: ``prepare_fx``/``convert_fx`` with ``get_default_qconfig_mapping("x86")`` (per-channel
  weights, free scales), evaluated with the converted int8 model.
* onnxruntime ``quantize_static`` on a float ONNX export: QDQ, ``per_channel=True``, MinMax / Entropy /
  Percentile, evaluated with onnxruntime (1 thread).

Prints JSON; ``--record`` also appends a table to benchmarks/RESULTS.md.

    nice -n 10 python benchmarks/bench_ptq.py [--threads 1] [--test-images 10000] [--skip-peers] [--record]
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from xnnq.calibrate import METHODS, QuantCalibrateModule
from xnnq.data import batches, cifar10, cifar10_available, data_root, evaluate
from xnnq.export.check import ort_session
from xnnq.models.cifar_resnet import resnet20_cifar10

from common import add_record_arg, emit, ort_calibration_reader

DUMMY = torch.zeros(1, 3, 32, 32)
GOAL_DROP, GOAL_SECONDS = 0.15, 1.0
VARIANTS = [
    ("pow2 per-tensor", {"bias_correction": False}),
    ("+ bias correction", {"bias_correction": True}),
    ("+ bias corr. + MSE weight clip", {"bias_correction": True, "weight_clipping": "mse"}),
]


def calibration_batches(n: int, batch_size: int = 100) -> list[torch.Tensor]:
    x, y = cifar10("train")
    torch.manual_seed(0)
    idx = torch.randperm(len(y))[:n]
    return [xb for xb, _ in batches(x[idx], y[idx], batch_size)]


def run(model, calib: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for xb in calib:
            model(xb)


def xnnq_row(model, calib, method: str, variant: str, opts: dict, test) -> dict:
    q = QuantCalibrateModule(model, DUMMY, method=method, **opts)
    w0, t0 = time.perf_counter(), time.process_time()
    q.train()
    run(q, calib)
    t1 = time.process_time()
    q.eval()
    w2, t2 = time.perf_counter(), time.process_time()
    return {
        "tool": "xnnq",
        "method": method,
        "variant": variant,
        "acc": evaluate(q, *test),
        "calib_s": t2 - t0,
        "finalize_s": t2 - t1,
        "calib_wall_s": w2 - w0,
    }


def torch_ao_row(model, calib, test) -> dict:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    w0, t0 = time.perf_counter(), time.process_time()
    prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), (DUMMY,))
    run(prepared, calib)
    converted = convert_fx(prepared)
    w1, t1 = time.perf_counter(), time.process_time()
    return {
        "tool": "torch.ao FX",
        "method": "x86 default qconfig (HistogramObserver act., per-channel weights)",
        "variant": "free scales, per-channel",
        "acc": evaluate(converted, *test),
        "calib_s": t1 - t0,
        "calib_wall_s": w1 - w0,
    }


def onnx_rows(model, calib, test, threads: int) -> list[dict]:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        quant_pre_process,
        quantize_static,
    )

    def accuracy(path: Path) -> float:
        sess = ort_session(path, threads=threads)  # the exact int8 kernel on x86 without VNNI, as onnx_check
        correct = 0
        for xb, yb in batches(*test, 500):
            correct += int((np.argmax(sess.run(None, {"input": xb.numpy()})[0], 1) == yb.numpy()).sum())
        return correct * 100.0 / len(test[1])

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        fp32, pre = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx"
        torch.onnx.export(
            copy.deepcopy(model).eval(),
            (DUMMY,),
            str(fp32),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
        )
        quant_pre_process(str(fp32), str(pre))
        rows.append({"tool": "onnxruntime", "method": "fp32", "variant": "float ONNX", "acc": accuracy(pre)})
        for name, cm in (
            ("MinMax", CalibrationMethod.MinMax),
            ("Entropy", CalibrationMethod.Entropy),
            ("Percentile", CalibrationMethod.Percentile),
        ):
            out = Path(tmp) / f"q_{name}.onnx"
            w0, t0 = time.perf_counter(), time.process_time()
            quantize_static(
                str(pre),
                str(out),
                ort_calibration_reader(calib),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                calibrate_method=cm,
            )
            w1, t1 = time.perf_counter(), time.process_time()
            rows.append(
                {
                    "tool": "onnxruntime",
                    "method": name,
                    "variant": "QDQ int8, per-channel weights",
                    "acc": accuracy(out),
                    "calib_s": t1 - t0,
                    "calib_wall_s": w1 - w0,
                }
            )
    return rows


def table(result: dict) -> str:
    fp32 = result["fp32_acc"]
    head = (
        f"ResNet-20 CIFAR-10 (JPEG), FP32 {fp32:.2f} %; {result['calib_images']} calibration images "
        f"(seed 0), {result['test_images']} test images; {result['threads']} thread(s). "
        f"Times are CPU seconds "
        f"(process time); the float model's forward over the calibration images takes "
        f"{result['float_forward_s']:.2f} s."
    )
    lines = [
        head,
        "",
        "| tool | method | variant | top-1 % | drop pp | calib s | finalize s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        cs = f"{r['calib_s']:.2f}" if "calib_s" in r else "—"
        fs = f"{r['finalize_s']:.2f}" if "finalize_s" in r else "—"
        lines.append(
            f"| {r['tool']} | {r['method']} | {r['variant']} | {r['acc']:.2f} | {fp32 - r['acc']:+.2f} | "
            f"{cs} | {fs} |"
        )
    best = result.get("best_xnnq")
    if best:
        lines.append(
            f"\nBest xnnq power-of-2 per-tensor: {best['method']} {best['variant']}, "
            f"drop {best['drop']:.2f} pp "
            f"(goal <= {GOAL_DROP:.2f}): {'met' if best['drop'] <= GOAL_DROP else 'NOT met'}. Calibration "
            f"{best['calib_s']:.2f} s per {result['calib_images']} images, "
            f"of which {best['finalize_s']:.2f} s "
            f"finalize and the rest forward passes "
            f"(float forward alone {result['float_forward_s']:.2f} s CPU); "
            f"goal <= {GOAL_SECONDS:.0f} s: {'met' if best['calib_s'] <= GOAL_SECONDS else 'NOT met'}."
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calib-images", type=int, default=1000)
    ap.add_argument("--test-images", type=int, default=10000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--skip-peers", action="store_true")
    add_record_arg(ap)
    args = ap.parse_args()
    if not cifar10_available():
        sys.exit(f"CIFAR-10 data/weights not found under {data_root()} (set XNNQ_DATA)")
    torch.set_num_threads(args.threads)
    model = resnet20_cifar10(data_root() / "weights" / "resnet20_cifar10jpg.pt").eval()
    calib = calibration_batches(args.calib_images)
    xt, yt = cifar10("test")
    test = (xt[: args.test_images], yt[: args.test_images])
    result = {
        "calib_images": args.calib_images,
        "test_images": len(test[1]),
        "threads": args.threads,
        "fp32_acc": evaluate(model, *test),
    }
    t0 = time.process_time()
    run(model, calib)
    result["float_forward_s"] = time.process_time() - t0
    rows = []
    for variant, opts in VARIANTS:
        for method in args.methods:
            rows.append(xnnq_row(model, calib, method, variant, opts, test))
            print(rows[-1], flush=True)
    if not args.skip_peers:
        rows.append(torch_ao_row(model, calib, test))
        print(rows[-1], flush=True)
        for r in onnx_rows(model, calib, test, args.threads):
            rows.append(r)
            print(r, flush=True)
    for r in rows:
        r["drop"] = round(result["fp32_acc"] - r["acc"], 2)
    result["rows"] = rows
    ours = [r for r in rows if r["tool"] == "xnnq"]
    result["best_xnnq"] = min(ours, key=lambda r: (r["drop"], r["calib_s"])) if ours else None
    emit("bench_ptq", result, table(result), record=args.record)


if __name__ == "__main__":
    main()
