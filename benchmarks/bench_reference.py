"""Three computations of one QDQ file on the CIFAR-10 ResNet-20 (issue 13, bit-true integer reference).

    python benchmarks/bench_reference.py [--calib-images 500] [--test-images 10000] [--threads 2] [--record]

1. ResNet-20 ($XNNQ_DATA/weights/resnet20_cifar10jpg.pt), PTQ with ``QuantCalibrateModule(method="mse")``
   on ``--calib-images`` training images (bench_ptq.py's sample: ``torch.manual_seed(0); randperm``).
2. QDQ export (``xnnq.export_onnx(..., format="qdq")``).
3. On the first ``--test-images`` test images, the logits of:
   * the PyTorch simulation, with TIDL's rounding (the default) and with round-half-to-even;
   * onnxruntime (CPU provider, the exact int8 kernel, graph optimizations on);
   * the integer reference (``xnnq.export.reference.run``) with ``rounding="tidl"`` and ``"half_even"``.
   For each pair: the fraction of logits equal bit for bit, of images whose 10 logits are all equal,
   the top-1 agreement; the top-1 accuracy of each; the reference's wall time; and (``onnx_check`` on
   the first batch) the first tensor where the TIDL-rounded computations part from onnxruntime.

Prints JSON; appends a table to benchmarks/RESULTS.md only with ``--record``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import xnnq
from xnnq.calibrate import QuantCalibrateModule
from xnnq.data import batches, cifar10, cifar10_available, data_root, evaluate
from xnnq.export.check import OnnxRunner, onnx_check
from xnnq.export.reference import run as reference_run
from xnnq.models.cifar_resnet import resnet20_cifar10

from common import emit

DUMMY = torch.zeros(1, 3, 32, 32)
PAIRS = [
    ("ref_half_even", "ort"),
    ("ref_half_even", "sim_half_even"),
    ("sim_half_even", "ort"),
    ("ref_tidl", "sim_tidl"),
    ("ref_tidl", "ort"),
    ("sim_tidl", "sim_half_even"),
]


def calibrated(n: int) -> QuantCalibrateModule:
    x, y = cifar10("train")
    torch.manual_seed(0)
    idx = torch.randperm(len(y))[:n]
    q = QuantCalibrateModule(
        resnet20_cifar10(data_root() / "weights" / "resnet20_cifar10jpg.pt"), DUMMY, method="mse"
    ).train()
    with torch.no_grad():
        for xb, _ in batches(x[idx], y[idx], 100):
            q(xb)
    return q.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib-images", type=int, default=500)
    ap.add_argument("--test-images", type=int, default=10000)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_reference"))
    ap.add_argument("--record", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = ap.parse_args()
    if not cifar10_available():
        sys.exit(f"CIFAR-10 / ResNet-20 weights not found under {data_root()} (set XNNQ_DATA)")
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    q = calibrated(args.calib_images)
    calib_s = time.perf_counter() - t0
    out = Path(args.out)
    path = xnnq.export_onnx(q, DUMMY, out / "resnet20_ptq_qdq.onnx", format="qdq").path
    xt, yt = cifar10("test", limit=args.test_images)
    runner = OnnxRunner(path, threads=args.threads)

    logits: dict[str, list[np.ndarray]] = {
        k: [] for k in ("sim_tidl", "sim_half_even", "ort", "ref_tidl", "ref_half_even")
    }
    seconds = {"ref_tidl": 0.0, "ref_half_even": 0.0, "ort": 0.0}
    labels = []
    first = None
    with torch.no_grad():
        for xb, yb in batches(xt, yt, args.batch):
            if first is None:
                first = xb[:100]
            labels.append(yb.numpy())
            xnnq.layers.set_rounding(q, "tidl")
            logits["sim_tidl"].append(q(xb).numpy())
            xnnq.layers.set_rounding(q, "half_even")
            logits["sim_half_even"].append(q(xb).numpy())
            t = time.perf_counter()
            logits["ort"].append(runner(xb).numpy())
            seconds["ort"] += time.perf_counter() - t
            for mode in ("tidl", "half_even"):
                t = time.perf_counter()
                logits[f"ref_{mode}"].append(
                    reference_run(path, xb.numpy(), rounding=mode, batch_size=100)[0]
                )
                seconds[f"ref_{mode}"] += time.perf_counter() - t
            done = sum(len(v) for v in labels)
            print(
                f"{done}/{len(yt)} images, reference {seconds['ref_tidl']:.0f} s + {seconds['ref_half_even']:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    xnnq.layers.set_rounding(q, "tidl")
    y = np.concatenate(labels)
    L = {k: np.concatenate(v) for k, v in logits.items()}
    n = len(y)
    res: dict = {
        "images": n,
        "calib_images": args.calib_images,
        "onnx": str(path),
        "calib_s": calib_s,
        "top1": {k: float((v.argmax(1) == y).mean() * 100) for k, v in L.items()},
        "bit_exact_logits": {},
        "bit_exact_images": {},
        "top1_agreement": {},
        "seconds": seconds,
    }
    for a, b in PAIRS:
        eq = L[a] == L[b]
        key = f"{a} vs {b}"
        res["bit_exact_logits"][key] = float(eq.mean())
        res["bit_exact_images"][key] = float(eq.all(1).mean())
        res["top1_agreement"][key] = float((L[a].argmax(1) == L[b].argmax(1)).mean())
    res["float_top1"] = evaluate(
        resnet20_cifar10(data_root() / "weights" / "resnet20_cifar10jpg.pt").eval(), xt, yt
    )
    chk = onnx_check(path, q, [first])  # TIDL's rounding in the simulation and the reference
    res["first_divergence_tidl_vs_onnxruntime"] = chk.first_divergence
    res["check_first_batch"] = chk.to_dict()

    t1, be, bi = res["top1"], res["bit_exact_logits"], res["bit_exact_images"]
    rows = "\n".join(
        f"| {a} vs {b} | {100 * be[f'{a} vs {b}']:.3f} % | {100 * bi[f'{a} vs {b}']:.2f} % | "
        f"{100 * res['top1_agreement'][f'{a} vs {b}']:.2f} % |"
        for a, b in PAIRS
    )
    div = res["first_divergence_tidl_vs_onnxruntime"] or {}
    first_tensor = div.get("ort-ref", {}).get("tensor", "none")
    table = (
        f"ResNet-20 CIFAR-10, PTQ mse on {args.calib_images} train images, QDQ export, {n} test images "
        f"({args.threads} threads).\n\n"
        "| top-1 % | float | sim (tidl) | sim (half-even) | onnxruntime | reference (tidl) "
        "| reference (half-even) |\n"
        f"| --- | --- | --- | --- | --- | --- | --- |\n"
        f"| | {res['float_top1']:.2f} | {t1['sim_tidl']:.2f} | {t1['sim_half_even']:.2f} | {t1['ort']:.2f} | "
        f"{t1['ref_tidl']:.2f} | {t1['ref_half_even']:.2f} |\n\n"
        "| pair | logits bit-exact | images bit-exact | top-1 agreement |\n| --- | --- | --- | --- |\n"
        f"{rows}\n\n"
        f"Integer reference wall time: {seconds['ref_tidl']:.0f} s (tidl), {seconds['ref_half_even']:.0f} s "
        f"(half-even); onnxruntime {seconds['ort']:.0f} s. First tensor where TIDL's rounding parts from "
        f"onnxruntime (first 100 images): `{first_tensor}`.\n"
    )
    print(table)
    emit(
        "bench_reference: simulation vs onnxruntime vs integer reference (ResNet-20)",
        res,
        table,
        record=args.record,
    )


if __name__ == "__main__":
    main()
