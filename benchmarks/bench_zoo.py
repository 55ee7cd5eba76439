#!/usr/bin/env python
"""Model coverage: torchvision's classifiers through the whole flow, each as torchvision builds it.

For each model (random init, ``weights=None``; GoogLeNet / Inception-v3 without auxiliary heads), in a child
process of its own, at the input size of its row:

1. ``QuantTrainModule(model, dummy)``, two QAT steps (forward, ``.sum().backward()``) on N(0, 1) batches of
   two, ``eval()``;
2. ``export_onnx`` in both formats and ``onnx_check`` on a batch of two: the "tidl" float graph against the
   export module, the "qdq" graph against the simulation (largest output difference, top-1 agreement, and the
   integer reference's result or the reason it cannot run the graph);
3. ``QuantCalibrateModule``: one calibration batch of four, ``eval()``, a forward.

A row fails at the first step that raises (its stage and message are printed). Input sizes are the smallest
the model takes without a degenerate feature map, 224 for the fixed-size vision transformers and for
AlexNet, whose adaptive pool ONNX cannot express at a smaller input (that refusal is a row of its own:
``vgg11_bn`` at 64). About 7 minutes at 1 thread.

    python benchmarks/bench_zoo.py [--models NAME ...] [--threads 1] [--record]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any

# model, input size
ROWS: tuple[tuple[str, int], ...] = (
    ("alexnet", 224),
    ("vgg11_bn", 64),
    ("squeezenet1_1", 64),
    ("densenet121", 32),
    ("googlenet", 64),
    ("inception_v3", 80),
    ("resnext50_32x4d", 32),
    ("wide_resnet50_2", 32),
    ("mobilenet_v3_small", 64),
    ("mobilenet_v3_large", 64),
    ("mnasnet0_5", 64),
    ("shufflenet_v2_x0_5", 64),
    ("efficientnet_v2_s", 64),
    ("regnet_x_400mf", 64),
    ("regnet_y_400mf", 64),
    ("convnext_tiny", 32),
    ("swin_t", 64),
    ("maxvit_t", 224),
    ("vit_b_16", 224),
)


def run_one(name: str, size: int) -> dict[str, Any]:
    """The flow above for one model, in this process."""
    import torch
    import torchvision

    import xnnq
    from xnnq.calibrate import QuantCalibrateModule
    from xnnq.export import export_onnx
    from xnnq.export.check import onnx_check

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    kwargs: dict[str, Any] = {"weights": None}
    if name in ("googlenet", "inception_v3"):
        kwargs.update(aux_logits=False, init_weights=True)
    model = getattr(torchvision.models, name)(**kwargs).eval()
    x = torch.randn(2, 3, size, size)
    row: dict[str, Any] = {"model": name, "input": size}
    stage = "wrap"
    t0 = time.perf_counter()
    try:
        q = xnnq.QuantTrainModule(model, x[:1]).train()
        stage = "QAT steps"
        for _ in range(2):
            q(torch.randn(2, 3, size, size)).sum().backward()
        q.eval()
        with tempfile.TemporaryDirectory() as d:
            for fmt in ("tidl", "qdq"):
                stage = f"export {fmt}"
                res = export_onnx(q, x[:1], os.path.join(d, f"{name}_{fmt}.onnx"), format=fmt)
                stage = f"check {fmt}"
                c = onnx_check(res.path, q if fmt == "qdq" else res.module, [x])
                row[fmt] = {"max_abs_diff": c.max_abs_diff, "top1_agreement": c.top1_agreement}
                if fmt == "qdq":  # onnx_check runs the integer reference on a QDQ file only
                    row[fmt]["reference"] = "exact" if c.reference_error is None else c.reference_error[:160]
        stage = "calibrate"
        cq = QuantCalibrateModule(model, x[:1])
        with torch.no_grad():
            cq(torch.randn(4, 3, size, size))
            cq.eval()(x)
        row["ok"] = True
    except Exception as e:  # the row records where and why the flow stopped
        row.update(ok=False, stage=stage, error=f"{type(e).__name__}: {str(e)[:300]}")
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | input | result | tidl: max diff | qdq: max diff, top-1 agreement | integer reference |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if not r.get("ok"):
            lines.append(
                f"| {r['model']} | {r.get('input', '')} | **{r.get('stage', '')}**: {r.get('error', '')} | | | |"
            )
            continue
        t, q = r["tidl"], r["qdq"]
        reason = q["reference"].split("; supported")[0].split(" (a constant")[0]  # the node and why, short
        lines.append(
            f"| {r['model']} | {r['input']} | ok | {t['max_abs_diff']:.2g} | {q['max_abs_diff']:.2g}, "
            f"{q['top1_agreement']:.2f} | {reason} |"
        )
    return "\n".join(lines)


def main() -> None:
    from common import add_record_arg, emit

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=[name for name, _ in ROWS])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--one", nargs=2, metavar=("NAME", "SIZE"), help=argparse.SUPPRESS)  # a child's row
    add_record_arg(ap)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]))))
        return
    sizes = dict(ROWS)
    unknown = [m for m in args.models if m not in sizes]
    if unknown:
        raise SystemExit(f"unknown models {unknown}; choose from {list(sizes)}")
    rows = []
    for name in args.models:
        cmd = [sys.executable, __file__, "--one", name, str(sizes[name]), "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        row = (
            json.loads(lines[-1])
            if lines
            else {"model": name, "ok": False, "stage": "child", "error": out.stderr[-300:]}
        )
        print(json.dumps(row), file=sys.stderr)
        rows.append(row)
    ok = sum(1 for r in rows if r.get("ok"))
    emit(
        "Model coverage (torchvision classifiers)",
        {"rows": rows, "ok": ok, "of": len(rows)},
        _table(rows) + f"\n\n{ok} of {len(rows)} rows ran the whole flow.",
        record=args.record,
    )


if __name__ == "__main__":
    main()
