"""Three computations of one QDQ file — the PyTorch simulation, onnxruntime and the integer reference — on
ResNet-20, the Mosaic-10 detector or the Mosaic-10 segmenter (issue 13, bit-true integer reference).

    python benchmarks/bench_reference.py [--model resnet20|mosaic_detector|mosaic_segmenter]
        [--calib-images N] [--test-images N] [--threads 1] [--record]

1. The float model and data of benchmarks/workloads.py; PTQ with ``QuantCalibrateModule(method="mse")``
   (power-of-2, per-tensor, bias correction) on ``--calib-images`` training images (ResNet-20: 500 drawn
   with ``torch.manual_seed(0); randperm``; the detector: the first 512 Mosaic-10 train images; the
   segmenter: the first 200).
2. QDQ export (``xnnq.export_onnx(..., format="qdq")``, batch 1 as for TIDL). The segmenter is exported with
   ``argmax=True`` (the graph ends in ``ArgMax``: an int64 class map); the ArgMax input (the dequantized
   logits) is also made a graph output in memory, so one pass compares the class map and the logits — the
   logits are those of the same nodes an export without ArgMax has.
3. On the first ``--test-images`` test images (CIFAR-10 test, Mosaic-10 val), every graph output of:
   * the PyTorch simulation with TIDL's rounding and with round-half-to-even (the class map: ArgMax of
     the simulated logits);
   * onnxruntime (CPU provider, the exact int8 kernel, graph optimizations on);
   * the integer reference (``xnnq.export.reference.IntegerReference``) with ``rounding="tidl"`` and
     ``"half_even"``.
   Per pair and output group (ResNet-20: the logits; the detector: its six head outputs together; the
   segmenter: the class map, the logits): the fraction of elements equal bit for bit and of images whose
   outputs are all equal; ResNet-20 also the top-1 agreement. For each pair that differs, the first
   quantized tensor (topological order) where their integer codes part (``xnnq.export.divergence``),
   located on the first ``--locate-images`` images where the pair's outputs differ. Per computation the
   task metric on the same images (top-1; COCO mAP / mAP50; mIoU / pixel accuracy) and the float model's.

Cost at 1 thread (CPU time, measured on the 2-core machine under load): the integer reference is numpy
and dominates, ~0.13 s per ResNet-20 image (32x32) and ~0.4 s per Mosaic-10 image (128x128, detector or
segmenter) for each of its two rounding modes; the simulation (two roundings) and the float model add
~0.3 s per Mosaic-10 image. Defaults: ResNet-20 all 10000 test images (~50 CPU-min); the detector and the
segmenter the first 400 val images, ~8 CPU-min each (the whole val set, ``--test-images 1000``: ~20).

Prints JSON; appends the tables to benchmarks/RESULTS.md only with ``--record``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import workloads

import xnnq
from xnnq.export.check import ort_session
from xnnq.export.divergence import first_divergence, ort_codes, sim_codes
from xnnq.export.reference import IntegerReference

from common import add_record_arg, emit

SOURCES = ("sim_tidl", "sim_half_even", "ort", "ref_tidl", "ref_half_even")
LABELS = {
    "float": "float",
    "sim_tidl": "sim (tidl)",
    "sim_half_even": "sim (half-even)",
    "ort": "onnxruntime",
    "ref_tidl": "reference (tidl)",
    "ref_half_even": "reference (half-even)",
}
PAIRS = [
    ("ref_half_even", "ort"),
    ("ref_half_even", "sim_half_even"),
    ("sim_half_even", "ort"),
    ("ref_tidl", "sim_tidl"),
    ("ref_tidl", "ort"),
    ("sim_tidl", "sim_half_even"),
]
DEFAULTS = {  # calibration images, test images, batch, integer-reference chunk
    "resnet20": (500, 10000, 500, 100),
    "mosaic_detector": (512, 400, 16, 16),
    "mosaic_segmenter": (200, 400, 16, 16),
}


def with_argmax_input(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose ``ArgMax`` input (the dequantized logits) is also a graph output."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    argmax = next(n for n in model.graph.node if n.op_type == "ArgMax")
    model.graph.output.append(helper.make_tensor_value_info(argmax.input[0], TensorProto.FLOAT, None))
    return model


def ort_outputs(session, x: np.ndarray) -> list[np.ndarray]:
    """Every output of ``session`` on ``x`` (split to the graph's static batch, the last chunk padded)."""
    inp = session.get_inputs()[0]
    b = inp.shape[0] if isinstance(inp.shape[0], int) else len(x)
    parts = []
    for i in range(0, len(x), b):
        c = x[i : i + b]
        n = len(c)
        if n < b:
            c = np.concatenate([c, np.zeros((b - n, *c.shape[1:]), c.dtype)])
        parts.append([o[:n] for o in session.run(None, {inp.name: c})])
    return [np.concatenate(p) for p in zip(*parts)]


def ref_outputs(ref: IntegerReference, x: np.ndarray, chunk: int) -> list[np.ndarray]:
    parts = [ref(x[i : i + chunk]) for i in range(0, len(x), chunk)]
    return [np.concatenate(p) for p in zip(*parts)]


def images_equal(a: list[np.ndarray], b: list[np.ndarray], idx) -> np.ndarray:
    """Per image: outputs ``idx`` of ``a`` and ``b`` equal bit for bit."""
    n = len(a[0])
    return np.logical_and.reduce([(a[i] == b[i]).reshape(n, -1).all(1) for i in idx])


class Run:
    """The calibrated wrapper, its export and the three computations (five with the rounding modes)."""

    def __init__(self, w: workloads.Workload, q, path: Path, threads: int, chunk: int):
        self.w, self.q, self.path, self.threads, self.chunk = w, q, path, threads, chunk
        model = onnx.load(str(path))
        if w.name == "mosaic_segmenter":
            model = with_argmax_input(model)
        self.refs = {m: IntegerReference(model, m) for m in ("tidl", "half_even")}
        self.session = ort_session(model, threads=threads)
        self.cpu = dict.fromkeys(("sim", "ort", "ref_tidl", "ref_half_even", "locate"), 0.0)

    @torch.no_grad()
    def outputs(self, x: torch.Tensor) -> dict[str, list[np.ndarray]]:
        out = {}
        t = time.process_time()
        for mode in ("tidl", "half_even"):
            xnnq.layers.set_rounding(self.q, mode)
            out[f"sim_{mode}"] = self.w.outputs(self.q(x))
        self.cpu["sim"] += time.process_time() - t
        t = time.process_time()
        out["ort"] = ort_outputs(self.session, x.numpy())
        self.cpu["ort"] += time.process_time() - t
        for mode, ref in self.refs.items():
            t = time.process_time()
            out[f"ref_{mode}"] = ref_outputs(ref, x.numpy(), self.chunk)
            self.cpu[f"ref_{mode}"] += time.process_time() - t
        return out

    @torch.no_grad()
    def codes(self, source: str, x: torch.Tensor) -> dict[str, np.ndarray]:
        """Integer codes of every QuantizeLinear output, by its output name, from one computation."""
        if source == "ort":
            return ort_codes(self.refs["half_even"], x.numpy(), True, self.threads)
        mode = source.split("_", 1)[1]
        if source.startswith("ref_"):
            return self.refs[mode].trace(x.numpy(), keep=True)[1]
        xnnq.layers.set_rounding(self.q, mode)
        return sim_codes(self.q, x, self.refs[mode], self.path)

    def locate(self, a: str, b: str, x: torch.Tensor) -> dict | None:
        """The first tensor where the codes of ``a`` and ``b`` part on ``x``."""
        t = time.process_time()
        # first_divergence names its sources "sim", "ort", "ref"; two of them carry a and b here
        found = first_divergence(self.refs["tidl"], {"sim": self.codes(a, x), "ort": self.codes(b, x)})
        self.cpu["locate"] += time.process_time() - t
        return None if found is None else found["sim-ort"]


def measure(args, w: workloads.Workload) -> dict:
    calib_n, test_n, batch, chunk = DEFAULTS[w.name]
    calib_n = args.calib_images or calib_n
    test_n = args.test_images or test_n
    batch = args.batch or batch
    float_model = w.float_model()
    q, calib_s = workloads.ptq(w, w.calibration_batches(calib_n), float_model, method="mse")
    out = Path(args.out)
    path = xnnq.export_onnx(
        q, w.dummy(), out / f"{w.name}_ptq_qdq.onnx", format="qdq", argmax=w.name == "mosaic_segmenter"
    ).path
    run = Run(w, q, path, args.threads, chunk)

    metrics = {k: w.metric(float_model) for k in ("float", *SOURCES)}
    pair_keys = [f"{a} vs {b}" for a, b in PAIRS]
    n_out = 0
    equal: dict[str, list[int]] = {}  # per pair, per output: elements equal bit for bit
    total: list[int] = []  # per output: elements
    img_eq = {k: {g: 0 for g, _ in w.groups} for k in pair_keys}
    top1 = dict.fromkeys(pair_keys, 0)
    where: dict[str, dict | None] = {}
    n = 0
    for x, labels in w.test_batches(test_n, batch):
        outs = run.outputs(x)
        with torch.no_grad():
            metrics["float"].update(w.outputs(float_model(x)), labels)
        for k in SOURCES:
            metrics[k].update(outs[k], labels)
        if not n_out:
            n_out = len(outs["ort"])
            total = [0] * n_out
            equal = {k: [0] * n_out for k in pair_keys}
        for i in range(n_out):
            total[i] += outs["ort"][i].size
        for (a, b), key in zip(PAIRS, pair_keys):
            for i in range(n_out):
                equal[key][i] += int((outs[a][i] == outs[b][i]).sum())
            for g, idx in w.groups:
                img_eq[key][g] += int(images_equal(outs[a], outs[b], idx).sum())
            if w.name == "resnet20":
                top1[key] += int((outs[a][0].argmax(1) == outs[b][0].argmax(1)).sum())
            if key not in where:
                differ = np.flatnonzero(~images_equal(outs[a], outs[b], range(n_out)))
                if len(differ):
                    sel = differ[: args.locate_images]
                    found = run.locate(a, b, x[torch.from_numpy(sel)])
                    where[key] = {"images": [int(n + i) for i in sel], **(found or {"tensor": None})}
        n += len(x)
        print(
            f"{n}/{test_n} images; CPU s: " + ", ".join(f"{k} {v:.0f}" for k, v in run.cpu.items()),
            file=sys.stderr,
            flush=True,
        )
    xnnq.layers.set_rounding(q, "half_even")  # the simulation's default
    res: dict = {
        "model": w.name,
        "images": n,
        "calib_images": calib_n,
        "onnx": str(path),
        "outputs": [o.name for o in run.session.get_outputs()],
        "calib_cpu_s": calib_s,
        "metrics": {k: v.result() for k, v in metrics.items()},
        "bit_exact_elements": {
            k: {g: sum(equal[k][i] for i in idx) / sum(total[i] for i in idx) for g, idx in w.groups}
            for k in pair_keys
        },
        "bit_exact_elements_per_output": {k: [e / t for e, t in zip(equal[k], total)] for k in pair_keys},
        "bit_exact_images": {k: {g: v / n for g, v in img_eq[k].items()} for k in pair_keys},
        "first_divergence": {k: where.get(k) for k in pair_keys},
        "cpu_s": run.cpu,
    }
    if w.name == "resnet20":
        res["top1_agreement"] = {k: v / n for k, v in top1.items()}
    return res


def table(r: dict, w: workloads.Workload, threads: int) -> str:
    desc = {
        "resnet20": "ResNet-20 CIFAR-10",
        "mosaic_detector": "Mosaic-10 SSD detector (`mosaic_detector`)",
        "mosaic_segmenter": "Mosaic-10 segmenter (`mosaic_segmenter`, ArgMax export + its logits)",
    }[w.name]
    split = "test" if w.name == "resnet20" else "val"
    cols = ["float", *SOURCES]
    lines = [
        f"{desc}, PTQ mse on {r['calib_images']} train images, QDQ export, {r['images']} {split} images "
        f"({threads} thread(s)).",
        "",
        "| metric | " + " | ".join(LABELS[c] for c in cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for m in r["metrics"]["float"]:
        lines.append(f"| {m} | " + " | ".join(f"{r['metrics'][c][m]:.2f}" for c in cols) + " |")
    heads = [f"{g} {kind} bit-exact" for g, _ in w.groups for kind in ("elements", "images")]
    if w.name == "resnet20":
        heads.append("top-1 agreement")
    heads.append("first tensor where they part")
    lines += ["", "| pair | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    for a, b in PAIRS:
        k = f"{a} vs {b}"
        cells = []
        for g, _ in w.groups:
            cells += [
                f"{100 * r['bit_exact_elements'][k][g]:.3f} %",
                f"{100 * r['bit_exact_images'][k][g]:.2f} %",
            ]
        if w.name == "resnet20":
            cells.append(f"{100 * r['top1_agreement'][k]:.2f} %")
        d = r["first_divergence"][k]
        if d is None:
            cells.append("— (bit-exact)")
        elif d.get("tensor") is None:
            cells.append("outputs differ, no quantized tensor does")
        else:
            cells.append(f"`{d['tensor']}` ({d['elements']}/{d['of']} codes, max {d['max_lsb']} LSB)")
        lines.append(f"| {a} vs {b} | " + " | ".join(cells) + " |")
    c = r["cpu_s"]
    lines += [
        "",
        f"CPU time: integer reference {c['ref_tidl']:.0f} s (tidl) + {c['ref_half_even']:.0f} s (half-even) "
        f"= {(c['ref_tidl'] + c['ref_half_even']) / max(r['images'], 1):.2f} s per image; onnxruntime "
        f"{c['ort']:.0f} s; simulation {c['sim']:.0f} s (both roundings); calibration {r['calib_cpu_s']:.0f} s. "
        "First tensor: on the first images where the pair's outputs differ.",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=workloads.MODELS, default="resnet20")
    ap.add_argument("--calib-images", type=int, default=None, help="default: 500 / 512 / 200 (see above)")
    ap.add_argument(
        "--test-images", type=int, default=None, help="default: 10000 (ResNet-20), 400 (Mosaic-10)"
    )
    ap.add_argument(
        "--batch", type=int, default=None, help="test batch (default 500 ResNet-20, 16 Mosaic-10)"
    )
    ap.add_argument("--locate-images", type=int, default=2, help="images the first divergence is sought on")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_reference"))
    add_record_arg(ap)
    args = ap.parse_args()
    w = workloads.get(args.model)
    if (why := w.missing()) is not None:
        sys.exit(why)
    torch.set_num_threads(args.threads)
    res = measure(args, w)
    md = table(res, w, args.threads)
    emit(
        f"bench_reference: simulation vs onnxruntime vs integer reference ({w.name})",
        res,
        md,
        record=args.record,
    )
    print(md)


if __name__ == "__main__":
    main()
