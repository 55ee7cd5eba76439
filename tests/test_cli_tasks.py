"""``xnnq quantize --task detection | segmentation`` on Mosaic-10: metrics, files, the chip's formats, errors."""

import json
from pathlib import Path

import pytest
import torch

from xnnq.cli import main
from xnnq.cli.loading import build_model
from xnnq.data import data_root

MOSAIC = data_root() / "mosaic10"
needs_mosaic = pytest.mark.skipif(
    not (MOSAIC / "val" / "instances.json").is_file(),
    reason=f"Mosaic-10 not found at {MOSAIC} (set XNNQ_DATA)",
)
FAST = ["--threads", "1", "--no-progress"]


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


@needs_mosaic
def test_detection_ptq_from_the_command_line(tmp_path, capsys):
    """PTQ of the committed detector: mAP of the float model, the wrapper and both exports (each with its
    meta-architecture prototxt and options JSON); the QDQ file in onnxruntime scores what the wrapper does."""
    out = tmp_path / "det"
    args = ["quantize", "--task", "detection", "--model", "mosaic_detector", "--mode", "ptq"]
    assert main([*FAST, *args, "--calib-images", "64", "--limit-test", "100", "--out", str(out)]) == 0
    s = _summary(out)
    assert s["task"] == "detection" and s["mode"] == "ptq" and s["target"] is None
    assert 30.0 < s["float"]["mAP"] <= 100.0
    assert s["quantized"]["mAP"] >= s["float"]["mAP"] - 1.5
    assert set(s["onnx"]) == {"tidl", "qdq"}
    for fmt, r in s["onnx"].items():
        onnx = Path(r["path"])
        assert onnx.is_file() and onnx.with_suffix(".prototxt").is_file()
        assert onnx.with_suffix(".tidl.json").is_file()
        assert abs(r["mAP"] - s["quantized"]["mAP"]) <= 0.3, fmt
    assert (out / "quant_state.pt").is_file()
    assert json.loads((out / "quant_config.json").read_text())["task"] == "detection"
    assert "mAP" in capsys.readouterr().out
    # the classification-only commands refuse the folder, pointing at the summary
    assert main([*FAST, "eval", "--model", "mosaic_detector", "--quant-dir", str(out)]) == 2
    assert "summary.json" in capsys.readouterr().err


@needs_mosaic
def test_detection_qat_with_learned_ranges_from_the_command_line(tmp_path):
    """``--range-learning tqt`` on a detector: the thresholds are in the saved state and config, the task's QAT
    trains them (AdamW for the weights, Adam for the thresholds) and both exports score what the wrapper does."""
    out = tmp_path / "det"
    args = ["quantize", "--task", "detection", "--model", "mosaic_detector", "--mode", "qat"]
    limits = ["--limit-train", "64", "--batch-size", "16", "--limit-test", "50", "--range-learning", "tqt"]
    assert main([*FAST, *args, *limits, "--out", str(out)]) == 0
    s = _summary(out)
    assert json.loads((out / "quant_config.json").read_text())["kwargs"]["range_learning"] == "tqt"
    state = torch.load(out / "quant_state.pt", weights_only=True)
    assert sum(k.endswith("learned_range.log2_t") for k in state) >= 50
    assert s["quantized"]["mAP"] >= s["float"]["mAP"] - 2.0
    for fmt, r in s["onnx"].items():
        assert abs(r["mAP"] - s["quantized"]["mAP"]) <= 0.3, fmt


@needs_mosaic
def test_segmentation_qat_for_a_chip_from_the_command_line(tmp_path):
    """QAT of the committed segmenter for AM69A: that chip's format only (QDQ), the export ends in ArgMax and
    scores the wrapper's mIoU in onnxruntime within a small tolerance (free scales are requantized in float)."""
    out = tmp_path / "seg"
    args = ["quantize", "--task", "segmentation", "--model", "mosaic_segmenter", "--mode", "qat"]
    limits = ["--limit-train", "64", "--batch-size", "16", "--limit-test", "100"]
    assert main([*FAST, *args, *limits, "--target", "AM69A", "--out", str(out)]) == 0
    s = _summary(out)
    assert s["target"] == "AM69A" and set(s["onnx"]) == {"qdq"}
    assert 35.0 < s["float"]["mIoU"] <= 100.0
    assert s["quantized"]["mIoU"] >= s["float"]["mIoU"] - 2.0
    assert abs(s["onnx"]["qdq"]["mIoU"] - s["quantized"]["mIoU"]) <= 0.5
    import onnx

    graph = onnx.load(s["onnx"]["qdq"]["path"]).graph
    assert graph.node[-1].op_type == "ArgMax"


@needs_mosaic
def test_task_errors_name_the_fix(tmp_path, capsys):
    base = [*FAST, "quantize", "--mode", "ptq", "--out", str(tmp_path / "x")]
    assert main([*base, "--task", "detection", "--model", "resnet20"]) == 2
    assert "meta_arch" in capsys.readouterr().err
    assert (
        main([*base, "--task", "segmentation", "--model", "mosaic_segmenter", "--data", str(tmp_path)]) == 2
    )
    assert "images/ and masks/" in capsys.readouterr().err
    assert main([*base, "--task", "detection", "--model", "mosaic_detector", "--num-classes", "5"]) == 2
    assert "--num-classes" in capsys.readouterr().err


def test_torchvision_segmenters_build_without_downloads():
    """A torchvision detection / segmentation name is built with random weights throughout (no backbone
    download, which would fail offline)."""
    m = build_model("lraspp_mobilenet_v3_large", 11)
    assert m.classifier.low_classifier.out_channels == 11


def test_xnnq_networks_by_name_take_their_checkpoint_and_image_size(tmp_path):
    """``--model mobilenetv1`` (one of xnnq's networks) is built with its committed checkpoint and run at the
    images' own size, not at torchvision's 224."""
    from PIL import Image

    from xnnq.cli.loading import default_input_size, default_weights
    from xnnq.models import zoo

    (tmp_path / "a").mkdir()
    Image.new("RGB", (20, 20)).save(tmp_path / "a" / "0.png")
    assert default_input_size("mobilenetv1", tmp_path) == 20
    assert default_input_size("resnet18", tmp_path) == 224
    assert default_weights("mosaic_detector") == str(zoo.checkpoint_path("mosaic_detector"))
