#!/usr/bin/env python
"""Semantic segmentation on Mosaic-10 val: FP32, xnnq PTQ / QAT, exported ONNX, torch.ao and onnxruntime peers.

Model: ``load_pretrained("mosaic_segmenter")`` (UNet/DeepLabV3-lite on ResNet-20; scripts/train_segmenter.py).
Metric: mIoU and pixel accuracy (0-100) from one confusion matrix over the 1000 val images at 128x128
(``xnnq.tasks.segmentation.evaluate``), the same for every row. Calibration: the first ``--calib-images``
train images, no augmentation.

* PTQ: ``QuantCalibrateModule`` (8-bit power-of-2 per-tensor, ``--ptq-method``, bias correction).
* QAT: ``QuantTrainModule`` from the float model, fine-tuned with the library recipe
  ``xnnq.recipes.qat_finetune`` (BN frozen from the start, ranges frozen at half of the steps, cosine
  learning rate) for ``--qat-epochs`` over the train set with the training augmentation (scale, flip,
  ``--crop`` random crops), AdamW at ``--qat-lr``, cross-entropy with ``ignore_index``.
* Export of the QAT model with the ArgMax head (``xnnq.tasks.segmentation.export``): ``format="qdq"`` in
  onnxruntime and ``format="tidl"`` through the TIDL emulation (``xnnq.export.emulate``).
* Peers on the same float checkpoint and calibration images: torch.ao FX PTQ
  (``get_default_qconfig_mapping("x86")``) and onnxruntime ``quantize_static`` (QDQ, per-channel, MinMax).
* Step time: QAT train step / float train step (batch ``--batch-size`` of ``--crop`` crops, median of
  ``--timing-steps``).

Prints one table and the JSON; appends both to benchmarks/RESULTS.md only with ``--record``.

    python benchmarks/bench_segmentation.py [--threads 1] [--record]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import xnnq  # noqa: E402
from xnnq.data import data_root  # noqa: E402
from xnnq.models.zoo import checkpoint_info, load_pretrained  # noqa: E402
from xnnq.tasks import segmentation as seg  # noqa: E402

from common import (  # noqa: E402
    add_record_arg,
    calibrate_timed,
    emit,
    ort_calibration_reader,
    qat_finetune_timed,
    qat_optimizers,
    range_learning_kwargs,
)

GOALS = {"qat_drop": 0.5, "ptq_drop": 1.0, "export_diff": 0.1}
DUMMY = torch.zeros(1, 3, 128, 128)
QAT_LR, BATCH_SIZE, CROP = 5e-5, 32, 64  # the QAT recipe's defaults (also benchmarks/bench_tqt.py's)


class TrainCrops:
    """Re-iterable training batches: augmented (scale, crop/pad, flip), then one random crop per batch;
    ``limit``: the first ``limit`` training images only."""

    def __init__(self, root: Path, batch_size: int, crop: int, seed: int = 0, limit: int | None = None):
        self.root, self.batch_size, self.crop, self.limit = root, batch_size, crop, limit
        self.g = torch.Generator().manual_seed(seed)
        self.n = seg.load_split(root, "train", limit)[0].shape[0]

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def __iter__(self):
        for x, m in seg.batches(
            self.root, "train", batch_size=self.batch_size, limit=self.limit, train=True, generator=self.g
        ):
            yield seg.random_crop(x, m, self.crop, self.g) if self.crop else (x, m)


def loss_fn(out: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, masks, ignore_index=seg.IGNORE_INDEX)


def timed(fn, *args, **kwargs):
    t0 = time.process_time()
    out = fn(*args, **kwargs)
    return out, time.process_time() - t0


def ptq(model, calib: list[torch.Tensor], method: str):
    return calibrate_timed(model, DUMMY, calib, method=method, bias_correction=True)[0]


def qat(
    model,
    batches: TrainCrops,
    epochs: float,
    lr: float,
    *,
    range_learning: str = "statistics",
    init_batches: int = 20,
    anchor: str = "statistics",
    hysteresis: float | None = None,
    lr_th: float = 1e-2,
    trace: list | None = None,
    checkpoint: Path | None = None,
    checkpoint_every: int = 50,
):
    """The library recipe with AdamW and cross-entropy (``ignore_index``); learned thresholds
    (``range_learning="tqt"``, benchmarks/bench_tqt.py) get their own Adam at ``lr_th`` (traced into ``trace``
    when given: ``common.TracedAdam``). Resumable from
    ``checkpoint``. Returns the model, the steps and the CPU seconds (the sessions before a resume too)."""
    q = xnnq.QuantTrainModule(
        model, DUMMY, **range_learning_kwargs(range_learning, init_batches, anchor, hysteresis)
    )
    opts = qat_optimizers(q, lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=1e-4), lr_th, trace)
    steps = max(1, round(epochs * len(batches)))
    q, cpu_s = qat_finetune_timed(
        q,
        batches,
        steps=steps,
        optimizer=opts,
        loss_fn=loss_fn,
        desc="QAT",
        checkpoint=checkpoint,
        checkpoint_every=checkpoint_every,
    )
    return q, steps, cpu_s


def step_times(model, batches: TrainCrops, steps: int) -> dict:
    """Median CPU time (``process_time``: the machine is shared) of a float and of a QAT train step (same
    batches, SGD, BN frozen in both)."""
    out = {}
    data = []
    for i, b in enumerate(batches):
        data.append(b)
        if i + 1 == steps + 2:
            break
    for kind in ("float", "qat"):
        net = copy.deepcopy(model) if kind == "float" else xnnq.QuantTrainModule(model, DUMMY)
        net.train()
        xnnq.utils.freeze_bn(net)
        opt = torch.optim.SGD(net.parameters(), lr=1e-5, momentum=0.9)
        times = []
        for i, (x, m) in enumerate(data):
            t0 = time.process_time()
            loss = loss_fn(net(x), m)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i >= 2:  # warm-up
                times.append(time.process_time() - t0)
        out[kind] = sorted(times)[len(times) // 2]
    out["ratio"] = out["qat"] / out["float"]
    return out


def torch_ao(model, calib: list[torch.Tensor]):
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), (DUMMY,))
    with torch.no_grad():
        for x in calib:
            prepared(x)
    return convert_fx(prepared)


def ort_quantize_static(model, calib: list[torch.Tensor], tmp: Path) -> Path:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    fp32, pre, out = tmp / "fp32.onnx", tmp / "pre.onnx", tmp / "ort_int8.onnx"
    batch = calib[0].shape[0]  # static shapes (the Slice/Pad/Resize shape arithmetic folds away)
    torch.onnx.export(
        copy.deepcopy(model).eval(),
        (torch.zeros(batch, 3, 128, 128),),
        str(fp32),
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["logits"],
    )
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    quantize_static(
        str(pre),
        str(out),
        ort_calibration_reader(calib),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    return out


def table(r: dict) -> str:
    fp = r["rows"]["FP32"]["mIoU"]
    lines = [
        f"| Mosaic-10 val ({r['eval_images']} images, 128x128) | mIoU | pixel acc. | mIoU drop vs FP32 | goal |",
        "|---|---|---|---|---|",
    ]
    goals = {
        "xnnq PTQ": f"drop ≤ {GOALS['ptq_drop']}",
        "xnnq QAT": f"drop ≤ {GOALS['qat_drop']}",
        "QDQ export (onnxruntime)": f"within {GOALS['export_diff']} of QAT",
        "tidl export (TIDL emulation)": f"within {GOALS['export_diff']} of QAT",
    }
    for name, row in r["rows"].items():
        drop = "—" if name == "FP32" else f"{fp - row['mIoU']:+.2f}"
        lines.append(
            f"| {name} | {row['mIoU']:.2f} | {row['pixel_acc']:.2f} | {drop} | {goals.get(name, '')} |"
        )
    st, g = r["step_time"], r["goals"]
    lines.append("")
    lines.append(
        f"QAT: {r['qat']['steps']} steps of batch {r['batch_size']} ({r['qat']['epochs']} epoch, "
        f"{r['crop']}x{r['crop']} crops), AdamW lr {r['qat']['lr']} cosine, BN frozen, ranges frozen at "
        f"half; {r['qat']['cpu_s']:.0f} CPU s. PTQ: {r['calib_images']} images, method "
        f"{r['ptq_method']}, bias correction."
    )
    lines.append(
        f"QAT step / float step (batch {r['batch_size']}, median CPU time): {st['qat'] * 1e3:.0f} / "
        f"{st['float'] * 1e3:.0f} ms = **{st['ratio']:.2f}x**."
    )
    lines.append(
        "Goals: "
        + ", ".join(f"{k} {'met' if v['met'] else 'NOT met'} ({v['value']:+.2f})" for k, v in g.items())
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help="default $XNNQ_DATA/mosaic10")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calib-images", type=int, default=200)
    ap.add_argument("--eval-images", type=int, default=None, help="first N val images (default: all 1000)")
    ap.add_argument("--ptq-method", default="mse")
    ap.add_argument("--qat-epochs", type=float, default=1.0)
    ap.add_argument("--qat-lr", type=float, default=QAT_LR)
    ap.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    ap.add_argument("--crop", type=int, default=CROP)
    ap.add_argument("--timing-steps", type=int, default=7)
    ap.add_argument("--skip-peers", action="store_true")
    add_record_arg(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    root = args.data or data_root() / "mosaic10"
    model = load_pretrained("mosaic_segmenter").eval()
    if args.calib_images % 25:
        raise SystemExit("--calib-images must be a multiple of 25 (the calibration batch)")
    calib = [x for x, _ in seg.batches(root, "train", batch_size=25, limit=args.calib_images)]
    rows: dict[str, dict] = {}

    def row(name: str, target, **extra) -> None:
        res, cpu = timed(seg.evaluate, target, root, "val", limit=args.eval_images, progress=True)
        rows[name] = {**{k: round(v, 3) for k, v in res.items()}, "eval_cpu_s": round(cpu), **extra}
        print(name, json.dumps(rows[name]), flush=True, file=sys.stderr)

    row("FP32", model)
    q_ptq, cpu = timed(ptq, model, calib, args.ptq_method)
    row("xnnq PTQ", q_ptq, calib_cpu_s=round(cpu, 1))
    batches = TrainCrops(root, args.batch_size, args.crop)
    q_qat, steps, qat_cpu = qat(model, batches, args.qat_epochs, args.qat_lr)
    row("xnnq QAT", q_qat)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        row("QDQ export (onnxruntime)", seg.export(q_qat, tmp / "seg_qdq.onnx", format="qdq"))
        row("tidl export (TIDL emulation)", seg.export(q_qat, tmp / "seg_tidl.onnx", format="tidl"))
        if not args.skip_peers:
            row("torch.ao FX PTQ (x86, per-channel)", torch_ao(model, calib))
            row("onnxruntime quantize_static (MinMax, per-channel)", ort_quantize_static(model, calib, tmp))
    timing = step_times(model, batches, args.timing_steps)

    fp, qt = rows["FP32"]["mIoU"], rows["xnnq QAT"]["mIoU"]
    goals = {
        "QAT drop": {"value": fp - qt, "met": fp - qt <= GOALS["qat_drop"]},
        "PTQ drop": {
            "value": fp - rows["xnnq PTQ"]["mIoU"],
            "met": fp - rows["xnnq PTQ"]["mIoU"] <= GOALS["ptq_drop"],
        },
    }
    for name in ("QDQ export (onnxruntime)", "tidl export (TIDL emulation)"):
        d = rows[name]["mIoU"] - qt
        goals[f"{name.split(' ')[0]} vs QAT"] = {"value": d, "met": abs(d) <= GOALS["export_diff"]}
    result = {
        "model": "mosaic_segmenter",
        "checkpoint": checkpoint_info("mosaic_segmenter").get("val_mIoU"),
        "rows": rows,
        "goals": goals,
        "batch_size": args.batch_size,
        "crop": args.crop,
        "calib_images": args.calib_images,
        "ptq_method": args.ptq_method,
        "eval_images": args.eval_images or seg.load_split(root, "val")[0].shape[0],
        "qat": {"epochs": args.qat_epochs, "steps": steps, "lr": args.qat_lr, "cpu_s": qat_cpu},
        "step_time": timing,
    }
    emit("bench_segmentation", result, table(result), record=args.record)
    print(table(result))


if __name__ == "__main__":
    main()
