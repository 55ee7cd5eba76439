"""The scripts in ``examples/`` run as a user runs them (a fresh process, small sizes) and print what they say.

Each is run from an empty folder with ``XNNQ_DATA`` set, so nothing depends on the repository's working
directory; its printed numbers are parsed and checked against each other (an exported file evaluates as the
simulation it came from). Skipped without the shared data.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from xnnq.data import data_root

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
pytestmark = pytest.mark.slow


def _run(tmp_path: Path, script: str, *args: str, needs: str) -> str:
    root = data_root()
    if not (root / needs).exists():
        pytest.skip(f"needs the shared data: {root / needs} not found (set XNNQ_DATA)")
    env = {**os.environ, "XNNQ_DATA": str(root)}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _metrics(out: str, label: str) -> dict[str, float]:
    """The dict printed after ``label`` at the start of a line."""
    m = re.search(rf"^{re.escape(label)}\s+(\{{[^}}]*\}})", out, re.MULTILINE)
    assert m, f"no {label!r} line in:\n{out}"
    return ast.literal_eval(m.group(1))


def _percent(out: str, pattern: str) -> float:
    m = re.search(pattern, out)
    assert m, f"{pattern!r} not in:\n{out}"
    return float(m.group(1))


def test_detection_example(tmp_path):
    out = _run(tmp_path, "detection_qat.py", "--train-images", "64", "--eval-images", "50", "--out", "det",
               needs="mosaic10/val/instances.json")  # fmt: skip
    flt, qat = _metrics(out, "float"), _metrics(out, "QAT")
    assert flt["mAP"] > 20 and abs(qat["mAP"] - flt["mAP"]) < 5, out
    for fmt in ("tidl", "qdq"):  # the exported files evaluate as the simulation (TIDL emulation, onnxruntime)
        assert _metrics(out, fmt)["mAP"] == pytest.approx(qat["mAP"], abs=1e-9), out
        assert (tmp_path / "det" / f"mosaic_detector_{fmt}.prototxt").is_file()


def test_detection_example_for_a_chip(tmp_path):
    """``--target AM69A``: the chip's numerics, and only the format it takes (QDQ) with its meta-arch file."""
    out = _run(tmp_path, "detection_qat.py", "--train-images", "64", "--eval-images", "50", "--out", "det",
               "--target", "AM69A", needs="mosaic10/val/instances.json")  # fmt: skip
    qat = _metrics(out, "QAT")
    assert _metrics(out, "qdq")["mAP"] == pytest.approx(qat["mAP"], abs=0.5), (
        out
    )  # free scales: not bit-exact
    assert not re.search(r"^tidl ", out, re.MULTILINE), out
    assert (tmp_path / "det" / "mosaic_detector_qdq.prototxt").is_file()
    assert not (tmp_path / "det" / "mosaic_detector_tidl.onnx").exists()


def test_segmentation_example(tmp_path):
    out = _run(tmp_path, "segmentation_qat.py", "--train-images", "64", "--eval-images", "50", "--out", "seg",
               needs="mosaic10/val/masks")  # fmt: skip
    flt, qat = _metrics(out, "float"), _metrics(out, "QAT")
    assert flt["mIoU"] > 20 and abs(qat["mIoU"] - flt["mIoU"]) < 5, out
    for fmt in ("tidl", "qdq"):
        assert _metrics(out, fmt)["mIoU"] == pytest.approx(qat["mIoU"], abs=1e-9), out
        assert (tmp_path / "seg" / f"mosaic_segmenter_{fmt}.onnx").is_file()


def test_ptq_example(tmp_path):
    out = _run(tmp_path, "ptq_cifar10.py", "128", needs="cifar10/test")
    flt = _percent(out, r"float ([\d.]+) %")
    ptq = _percent(out, r"PTQ ([\d.]+) %")
    assert flt == pytest.approx(88.14) and ptq > flt - 1.0, out
    # the QDQ file runs the quantized model in onnxruntime: the simulation's accuracy
    assert _percent(out, r"resnet20_ptq_qdq\.onnx: onnxruntime ([\d.]+) %") == ptq, out
    assert (tmp_path / "resnet20_ptq_tidl.tidl.json").is_file()


def test_qat_example(tmp_path):
    out = _run(tmp_path, "qat_cifar10.py", "0.02", needs="cifar10/train")
    flt = _percent(out, r"float ([\d.]+) %")
    assert flt == pytest.approx(88.14) and _percent(out, r"QAT ([\d.]+) %") > flt - 1.0, out
    assert (tmp_path / "resnet20_qat_tidl.onnx").is_file() and (
        tmp_path / "resnet20_qat_tidl.tidl.json"
    ).is_file()


def test_analysis_example(tmp_path):
    out = _run(tmp_path, "analysis.py", "an", "500", needs="cifar10/test")
    m = re.search(r"8-bit PTQ ([\d.]+) % \| \+ \[.+\] in 16 bits ([\d.]+) %", out)
    assert m, out
    assert float(m.group(2)) >= float(m.group(1)), out  # the suggested 16-bit layers do not lose accuracy


def test_reparam_examples(tmp_path):
    out = _run(
        tmp_path, "reparam_ptq.py", "--calib-images", "128", "--eval-images", "300", needs="cifar10/test"
    )
    fp32 = _percent(out, r"FP32 repvgg: ([\d.]+)%")
    assert _percent(out, r"FP32 after BN restore \+ CLE: ([\d.]+)%") == pytest.approx(fp32, abs=0.5), out
    assert _percent(out, r"INT8 PTQ \(power-of-2, per-tensor\): ([\d.]+)%") > fp32 - 3.0, out
    out = _run(
        tmp_path, "reparam_qat.py", "--train-images", "256", "--eval-images", "300", needs="cifar10/test"
    )
    assert _percent(out, r"INT8 QAT \(256 images\): ([\d.]+)%") > fp32 - 3.0, out


def test_torchvision_imagefolder_example(tmp_path):
    folder = data_root() / "cifar10" / "test"
    out = _run(
        tmp_path, "torchvision_imagefolder.py", str(folder), "mobilenet_v2", "-", "64", needs="cifar10/test"
    )
    assert re.search(r"mobilenet_v2: float [\d.]+ %  PTQ [\d.]+ %", out), out
