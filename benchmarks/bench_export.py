"""Export fidelity on the CIFAR-10 ResNet-20 QAT model (issue 3 acceptance 2).

    nice -n 10 python benchmarks/bench_export.py [--qat runs/qat_resnet20.pt] [--out runs/export] [--limit N]
        [--record]

Measures, on the 10k CIFAR-10 test images:
* QDQ export in onnxruntime (CPU) vs QuantTestModule: top-1 agreement, |Δlogit| in output LSBs;
* "tidl" float export in onnxruntime vs the same graph in PyTorch (eval, Clips): max |diff|;
* TIDL emulation of the "tidl" export (weights re-quantized from the float ONNX, activations from the
  Clip ranges, run as QDQ in onnxruntime): accuracy vs QuantTestModule, weight re-quantization error.

Uses the QAT state dict of benchmarks/bench_qat.py when it exists; otherwise runs a short QAT itself
(fallback, reported as such). Prints JSON; ``--record`` also appends to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import torch

import xnnq
from xnnq import data
from xnnq.export import export_onnx
from xnnq.export.check import onnx_accuracy, onnx_check, output_lsb
from xnnq.export.emulate import requantization_error, tidl_emulation
from xnnq.models.cifar_resnet import resnet20, resnet20_cifar10
from xnnq.recipes import qat_finetune

from common import add_record_arg, emit

DUMMY = (1, 3, 32, 32)


def short_qat(weights: Path, images: int = 512, steps: int = 40) -> dict:
    """Fallback QAT state: a few steps on a few hundred training images (SGD momentum 0.9, constant lr
    1e-4, no weight decay), BN and ranges frozen half-way."""
    torch.manual_seed(0)
    X, Y = data.cifar10("train", limit=images)
    q = xnnq.QuantTrainModule(resnet20_cifar10(weights), torch.randn(*DUMMY))
    train = data.Batches(
        X, Y, 64, shuffle=True, train_augment=True, generator=torch.Generator().manual_seed(0)
    )
    opt = torch.optim.SGD(q.parameters(), lr=1e-4, momentum=0.9)
    q = qat_finetune(
        q,
        train,
        steps=steps,
        optimizer=opt,
        lr_schedule="constant",
        freeze_bn_at=0.5,
        freeze_range_at=0.5,
        progress=False,
    )
    return q.state_dict()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--qat", default="runs/qat_resnet20.pt")
    ap.add_argument("--out", default="runs/export")
    ap.add_argument("--limit", type=int, default=None, help="test images (default: all 10k)")
    ap.add_argument("--batch", type=int, default=1, help="static batch of the exported graphs")
    ap.add_argument("--threads", type=int, default=1)
    add_record_arg(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not data.cifar10_available():
        sys.exit(f"shared data not found under {data.data_root()} (set XNNQ_DATA)")
    Xte, Yte = data.cifar10("test", limit=args.limit)
    res: dict = {"test_images": len(Yte), "export_batch": args.batch}
    qat = Path(args.qat)
    if qat.is_file():
        state = torch.load(qat, weights_only=True)
        res["qat_source"] = (
            f"{qat} (sha256 {hashlib.sha256(qat.read_bytes()).hexdigest()[:12]}, from bench_qat.py)"
        )
    else:
        state = short_qat(data.data_root() / "weights" / "resnet20_cifar10jpg.pt")
        res["qat_source"] = "fallback: 40-step QAT on 512 train images (runs/qat_resnet20.pt absent)"
    q = xnnq.QuantTestModule(resnet20(), torch.randn(*DUMMY))
    q.load_state_dict(state)
    res["quanttest_top1"] = data.evaluate(q, Xte, Yte)

    out = Path(args.out)
    dummy = torch.randn(args.batch, *DUMMY[1:])
    t = time.perf_counter()
    tidl = export_onnx(q, dummy, out / "resnet20_tidl.onnx", format="tidl")
    res["tidl_export_seconds"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    qdq = export_onnx(q, dummy, out / "resnet20_qdq.onnx", format="qdq")
    res["qdq_export_seconds"] = round(time.perf_counter() - t, 2)
    res["tidl_op_counts"] = tidl.op_counts()
    res["qdq_op_counts"] = qdq.op_counts()

    def batches():
        return data.batches(Xte, Yte, 500)

    # onnxruntime rounds a QDQ file half to even: compare with the simulation rounding the same way (TIDL's
    # rounding, the default, against the integer reference: benchmarks/bench_reference.py)
    xnnq.layers.set_rounding(q, "half_even")
    for optimize in (True, False):
        key = "qdq_vs_quanttest" + ("" if optimize else "_ort_no_fusion")
        res[key] = onnx_check(
            qdq.path, q, batches(), optimize=optimize, threads=args.threads, integer_reference=False
        ).to_dict()
    res["qdq_onnx_top1"] = onnx_accuracy(qdq.path, batches(), threads=args.threads)
    res["tidl_vs_torch_clip_graph"] = onnx_check(
        tidl.path, tidl.module, batches(), threads=args.threads
    ).to_dict()
    res["tidl_float_onnx_top1"] = onnx_accuracy(tidl.path, batches(), threads=args.threads)
    req = requantization_error(tidl.path)
    res["tidl_weights_requantization_max_abs_error"] = max(req.values())
    res["tidl_weights_checked"] = len(req)
    emu = tidl_emulation(tidl.path)
    res["tidl_emulated_top1"] = onnx_accuracy(emu, batches(), threads=args.threads)
    res["tidl_emulated_minus_quanttest_pp"] = round(res["tidl_emulated_top1"] - res["quanttest_top1"], 3)
    res["tidl_emulation_vs_quanttest"] = onnx_check(
        emu, q, batches(), threads=args.threads, lsb=output_lsb(qdq.path)
    ).to_dict()

    a, e = res["qdq_vs_quanttest"], res["tidl_vs_torch_clip_graph"]
    table = (
        f"QAT model: {res['qat_source']}; {res['test_images']} CIFAR-10 test images; "
        f"exported batch {args.batch}; "
        "onnxruntime CPU.\n\n"
        "| check | result |\n|---|---|\n"
        f"| QuantTestModule top-1 | {res['quanttest_top1']:.2f} % |\n"
        f"| QDQ (ORT) vs QuantTestModule: top-1 agreement | {100 * a['top1_agreement']:.2f} % |\n"
        f"| QDQ (ORT) vs QuantTestModule: logits within 1 LSB / bit-exact | "
        f"{100 * a['frac_within_1_lsb']:.3f} % / "
        f"{100 * a['frac_exact']:.3f} % (max {a['max_lsb_diff']:.3g} LSB) |\n"
        f"| QDQ (ORT, no graph fusion) max LSB diff | "
        f"{res['qdq_vs_quanttest_ort_no_fusion']['max_lsb_diff']:.3g} |\n"
        f'| "tidl" ONNX (ORT) vs PyTorch clip graph: max abs diff | {e["max_abs_diff"]:.3g} |\n'
        f'| "tidl" weights re-quantized: max abs change ({res["tidl_weights_checked"]} tensors) | '
        f"{res['tidl_weights_requantization_max_abs_error']:.3g} |\n"
        f"| TIDL-emulated top-1 (Δ vs QuantTestModule) | {res['tidl_emulated_top1']:.2f} % "
        f"({res['tidl_emulated_minus_quanttest_pp']:+.2f} pp) |\n"
        f'| "tidl" ONNX node types | {", ".join(f"{k} {v}" for k, v in res["tidl_op_counts"].items())} |\n'
        f"| QDQ ONNX node types | {', '.join(f'{k} {v}' for k, v in res['qdq_op_counts'].items())} |\n"
    )
    emit("bench_export: export fidelity (ResNet-20, CIFAR-10)", res, table, record=args.record)


if __name__ == "__main__":
    main()
