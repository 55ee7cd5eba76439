#!/usr/bin/env python
"""Object detection on Mosaic-10 val: FP32, xnnq PTQ / QAT, exported ONNX, torch.ao and onnxruntime peers.

Model: ``load_pretrained("mosaic_detector")`` (SSD, ResNet-20 backbone, FPN; scripts/train_detector.py).
Metric: COCO mAP@[.5:.95] and mAP@.5 (pycocotools, 0-100) on the 1000 val images (``--eval-images``),
the same decode + NMS (caffe-SSD DetectionOutput: score > 0.01, NMS 0.45 per class, 100 per image) for
every row. Calibration: the first ``--calib-images`` train images, no augmentation.

* PTQ: ``QuantCalibrateModule`` (8-bit power-of-2 per-tensor, bias correction) for each ``--methods``;
  the best one again with 16-bit for the first conv and the head convs (``bitwidth_overrides``).
* QAT: ``QuantTrainModule`` from the float model through the generic loop ``xnnq.recipes.qat_finetune``
  (BN frozen from the start, ranges frozen at half of the run, cosine) with the SSD loss and AdamW at
  ``--qat-lr``, ``--qat-epochs`` over the train set with the training augmentation.
* Export of the QAT model: ``format="qdq"`` in onnxruntime and ``format="tidl"`` through the TIDL
  emulation (``xnnq.export.emulate``), compared with the QAT model in PyTorch.
* Peers on the same float model and images: torch.ao FX PTQ (``get_default_qconfig_mapping("x86")``)
  and onnxruntime ``quantize_static`` (QDQ, per-channel, MinMax).
* Step time: QAT train step / float train step (batch ``--batch-size``, median of ``--timing-steps``).

Prints one table and the JSON; appends both to benchmarks/RESULTS.md only with ``--record``.

    python benchmarks/bench_detection.py [--threads 1] [--record]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import xnnq
from xnnq.data import data_root
from xnnq.models.zoo import checkpoint_info, load_pretrained
from xnnq.tasks import detection
from xnnq.tasks.ssd import multibox_loss

from common import (
    calibrate_timed,
    emit,
    ort_calibration_reader,
    qat_finetune_timed,
    qat_optimizers,
    range_learning_kwargs,
)

GOALS = {"qat_drop": 0.5, "ptq_drop": 1.0, "export_diff": 0.1}
QAT_LR, BATCH_SIZE = 1e-4, 32  # the QAT recipe's defaults (also benchmarks/bench_tqt.py's)
HEADS_16 = {"first": 16, "heads.box.*": 16, "heads.cls.*": 16}


def calib_batches(train_json: Path, n: int, batch_size: int = 32) -> list[torch.Tensor]:
    return [x for x, _ in detection.batches(train_json, batch_size=batch_size, limit=n)]


def ptq(model, calib, **kw):
    return calibrate_timed(model, torch.zeros(1, 3, 128, 128), calib, **kw)


def qat(
    model,
    train_json: Path,
    *,
    epochs: float,
    lr: float,
    batch_size: int,
    limit: int | None,
    range_learning: str = "statistics",
    init_batches: int = 20,
    anchor: str = "statistics",
    hysteresis: float | None = None,
    lr_th: float = 1e-2,
    trace: list | None = None,
    checkpoint: Path | None = None,
    checkpoint_every: int = 50,
):
    """The generic recipe (``xnnq.recipes.qat_finetune``) with the SSD loss and AdamW; learned thresholds
    (``range_learning="tqt"``, benchmarks/bench_tqt.py) get their own Adam at ``lr_th`` (traced into ``trace``
    when given: ``common.TracedAdam``). Resumable from
    ``checkpoint``; ``cpu_s`` counts the sessions before a resume too."""
    q = xnnq.QuantTrainModule(
        model,
        torch.zeros(1, 3, 128, 128),
        **range_learning_kwargs(range_learning, init_batches, anchor, hysteresis),
    )
    train = detection.batches(train_json, batch_size=batch_size, train=True, limit=limit, seed=1)
    opts = qat_optimizers(q, lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0), lr_th, trace)
    q, cpu_s = qat_finetune_timed(
        q,
        train,
        epochs=epochs,
        optimizer=opts,
        loss_fn=lambda out, targets: multibox_loss(model.meta_arch, out, targets)[0],
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
    )
    return q, {"steps": max(1, round(epochs * len(train))), "cpu_s": cpu_s}


def step_times(model, train_json: Path, batch_size: int, steps: int) -> dict:
    images, targets = next(
        iter(detection.batches(train_json, batch_size=batch_size, train=True, limit=batch_size))
    )
    out = {}
    for name, net in (
        ("float", copy.deepcopy(model).train()),
        ("qat", xnnq.QuantTrainModule(model, torch.zeros(1, 3, 128, 128)).train()),
    ):
        opt = torch.optim.SGD(net.parameters(), lr=1e-5)
        times = []
        for i in range(steps + 2):
            t0 = time.perf_counter()
            loss, _ = multibox_loss(model.meta_arch, net(images), targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i >= 2:
                times.append(time.perf_counter() - t0)
        out[name] = sorted(times)[len(times) // 2]
    out["ratio"] = out["qat"] / out["float"]
    return out


def torch_ao(model, calib):
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    prepared = prepare_fx(
        copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), (torch.zeros(1, 3, 128, 128),)
    )
    with torch.no_grad():
        for x in calib:
            prepared(x)
    return convert_fx(prepared)


def ort_quantize_static(model, calib, tmp: Path) -> Path:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        quant_pre_process,
        quantize_static,
    )

    fp32, pre, out = tmp / "fp32.onnx", tmp / "pre.onnx", tmp / "ort_qdq.onnx"
    names = [f"out{i}" for i in range(6)]
    torch.onnx.export(
        copy.deepcopy(model).eval(),
        (torch.zeros(1, 3, 128, 128),),
        str(fp32),
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=names,
    )  # static batch 1, as TIDL
    quant_pre_process(str(fp32), str(pre))
    quantize_static(
        str(pre),
        str(out),
        ort_calibration_reader([x[i : i + 1] for x in calib for i in range(len(x))]),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        calibrate_method=CalibrationMethod.MinMax,
    )
    return out


def table(r: dict) -> str:
    fp = r["fp32"]["mAP"]
    head = (
        f"Mosaic-10 val ({r['eval_images']} images), SSD ResNet-20-FPN detector (`mosaic_detector`, "
        f"{r['checkpoint']}); {r['calib_images']} calibration images; {r['threads']} thread(s). "
        "mAP = COCO mAP@[.5:.95], drop in points vs FP32."
    )
    lines = [head, "", "| row | mAP | mAP@.5 | drop | goal |", "|---|---|---|---|---|"]
    for row in r["rows"]:
        goal = row.get("goal", "")
        lines.append(
            f"| {row['name']} | {row['mAP']:.2f} | {row['mAP50']:.2f} | {fp - row['mAP']:+.2f} | {goal} |"
        )
    st = r["step_time"]
    lines.append(
        f"\nQAT step / float step (batch {r['batch_size']}, median): {st['qat'] * 1e3:.0f} / "
        f"{st['float'] * 1e3:.0f} ms = **{st['ratio']:.2f}x**. QAT: {r['qat']['steps']} steps "
        f"({r['qat_epochs']} epoch(s) of {r['qat_images']} train images, batch {r['batch_size']}), AdamW lr "
        f"{r['qat_lr']} cosine, BN frozen, ranges frozen at half; {r['qat']['cpu_s'] / 60:.1f} CPU-min."
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-images", type=int, default=None, help="val images (default all 1000)")
    ap.add_argument("--calib-images", type=int, default=512)
    ap.add_argument("--methods", nargs="+", default=["mse", "percentile", "max"])
    ap.add_argument("--qat-epochs", type=float, default=1.0)
    ap.add_argument("--qat-lr", type=float, default=QAT_LR)
    ap.add_argument("--qat-images", type=int, default=None, help="train images per QAT epoch (default all)")
    ap.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    ap.add_argument("--timing-steps", type=int, default=7)
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_detection"))
    ap.add_argument(
        "--record", action="store_true", help="append the table and JSON to benchmarks/RESULTS.md"
    )
    args = ap.parse_args()
    root = data_root() / "mosaic10"
    train_json, val_json = root / "train" / "instances.json", root / "val" / "instances.json"
    if not val_json.is_file():
        sys.exit(f"Mosaic-10 not found under {root} (set XNNQ_DATA)")
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = load_pretrained("mosaic_detector")
    meta = model.meta_arch
    info = checkpoint_info("mosaic_detector")

    def ev(m, **kw):
        if isinstance(m, torch.nn.Module):
            kw.setdefault("meta_arch", meta)
        t0 = time.process_time()
        res = detection.evaluate(m, val_json, limit=args.eval_images, threads=args.threads, **kw)
        res = {k: round(v, 3) for k, v in res.items()}
        print(json.dumps(res), f"({time.process_time() - t0:.0f} CPU s)", flush=True)
        return res

    r: dict = {
        "eval_images": args.eval_images or 1000,
        "calib_images": args.calib_images,
        "threads": args.threads,
        "checkpoint": f"val mAP {info['val_mAP']}, {info['epochs']} epochs, {info['cpu_hours']} CPU-h",
        "batch_size": args.batch_size,
        "qat_epochs": args.qat_epochs,
        "qat_lr": args.qat_lr,
        "qat_images": args.qat_images or 6000,
        "goals": GOALS,
    }
    rows = []
    r["fp32"] = ev(model)
    rows.append({"name": "FP32", **r["fp32"]})
    fp = r["fp32"]["mAP"]
    calib = calib_batches(train_json, args.calib_images)
    ptq_rows = []
    for method in args.methods:
        q, secs = ptq(model, calib, method=method)
        ptq_rows.append(
            {"name": f"xnnq PTQ {method}, 8-bit", "method": method, "calib_cpu_s": round(secs, 1), **ev(q)}
        )
    best = max(ptq_rows, key=lambda row: row["mAP"])
    best["goal"] = (
        f"drop <= {GOALS['ptq_drop']}: {'met' if fp - best['mAP'] <= GOALS['ptq_drop'] else 'NOT met'}"
    )
    rows += ptq_rows
    q16, secs = ptq(model, calib, method=best["method"], bitwidth_overrides=HEADS_16)
    rows.append(
        {
            "name": f"xnnq PTQ {best['method']}, 16-bit first conv + head convs",
            "calib_cpu_s": round(secs, 1),
            **ev(q16),
        }
    )
    qq, r["qat"] = qat(
        model,
        train_json,
        epochs=args.qat_epochs,
        lr=args.qat_lr,
        batch_size=args.batch_size,
        limit=args.qat_images,
    )
    torch.save(qq.state_dict(), out_dir / "qat_state.pt")
    sim = ev(qq)
    rows.append(
        {
            "name": "xnnq QAT (PyTorch simulation), 8-bit",
            **sim,
            "goal": f"drop <= {GOALS['qat_drop']}: {'met' if fp - sim['mAP'] <= GOALS['qat_drop'] else 'NOT met'}",
        }
    )
    for fmt, label in (
        ("qdq", "QAT export `qdq` in onnxruntime"),
        ("tidl", "QAT export `tidl` via TIDL emulation"),
    ):
        path = detection.export(qq, out_dir / f"mosaic_detector_{fmt}.onnx", format=fmt, meta_arch=meta)
        res = ev(path)
        ok = abs(res["mAP"] - sim["mAP"]) <= GOALS["export_diff"]
        rows.append(
            {
                "name": label,
                **res,
                "goal": f"within {GOALS['export_diff']} of the simulation "
                f"({res['mAP'] - sim['mAP']:+.3f}): {'met' if ok else 'NOT met'}",
            }
        )
    if not args.skip_peers:
        rows.append(
            {"name": "torch.ao FX PTQ, x86 qconfig (free scales, per-channel)", **ev(torch_ao(model, calib))}
        )
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(
                {
                    "name": "onnxruntime quantize_static, QDQ per-channel MinMax",
                    **ev(ort_quantize_static(model, calib, Path(tmp)), meta_arch=meta),
                }
            )
    r["step_time"] = step_times(model, train_json, args.batch_size, args.timing_steps)
    r["rows"] = rows
    md = table(r)
    print(md)
    emit("bench_detection", r, md, record=args.record)


if __name__ == "__main__":
    main()
