"""The ``xnnq`` command line end to end, as subprocesses (marked ``slow``), on tiny generated data."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xnnq.cli import main
from xnnq.demo import gratings

FAST = ["--threads", "1", "--no-progress"]


def xnnq(*args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run the console script (``python -m xnnq.cli`` if it is not installed) in a subprocess."""
    exe = shutil.which("xnnq")
    cmd = [exe] if exe else [sys.executable, "-m", "xnnq.cli"]
    proc = subprocess.run([*cmd, *args], check=False, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"xnnq {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """ImageFolder train/ and test/ with 3 classes of 16x16 PNG gratings."""
    root = tmp_path_factory.mktemp("imgs")
    for split, n, seed in (("train", 48, 0), ("test", 24, 1)):
        x, y = gratings(n, seed=seed, noise=0.3)
        for i in range(n):
            label = int(y[i]) % 3
            d = root / split / f"class{label}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[i].permute(1, 2, 0).numpy().astype(np.uint8)).save(d / f"{i}.png")
    return root


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    p = xnnq(
        *FAST,
        "demo",
        "--out",
        str(out),
        "--train-images",
        "256",
        "--test-images",
        "64",
        "--epochs",
        "1",
        "--qat-epochs",
        "0.5",
    )
    assert "float accuracy" in p.stdout and "ONNX tidl" in p.stdout and "ONNX qdq" in p.stdout
    s = json.loads((out / "summary.json").read_text())
    assert set(s["onnx"]) == {"tidl", "qdq"}
    for r in s["onnx"].values():
        assert Path(r["path"]).is_file() and Path(r["path"]).with_suffix(".tidl.json").is_file()
        assert r["top1_agreement_pct"] >= 95.0
    assert (out / "analysis" / "sqnr.png").is_file()


@pytest.mark.slow
def test_quantize_eval_analyze(tiny_data, tmp_path):
    model = ["--model", "xnnq.demo:tiny_cnn", "--data", str(tiny_data), "--batch-size", "16"]
    out = tmp_path / "ptq"
    p = xnnq(
        *FAST,
        "quantize",
        *model,
        "--mode",
        "ptq",
        "--calib-images",
        "32",
        "--analysis-images",
        "16",
        "--out",
        str(out),
    )
    assert "PTQ" in p.stdout
    for f in (
        "model_tidl.onnx",
        "model_qdq.onnx",
        "model_tidl.tidl.json",
        "model_qdq.tidl.json",
        "quant_state.pt",
        "quant_config.json",
        "analysis/report.md",
        "analysis/report.json",
        "analysis/sqnr.png",
        "summary.json",
    ):
        assert (out / f).is_file(), f
    s = json.loads((out / "summary.json").read_text())
    assert s["test_images"] == 24 and s["onnx"]["tidl"]["top1_agreement_pct"] >= 90.0
    # QAT, a few steps, in this process (a subprocess would pay the torch import again)
    torch_out = tmp_path / "qat"
    assert (
        main(
            [
                "--no-progress",
                "quantize",
                *model,
                "--mode",
                "qat",
                "--epochs",
                "0.5",
                "--lr",
                "1e-3",
                "--analysis-images",
                "0",
                "--sixteen-bit",
                "first",
                "--out",
                str(torch_out),
            ]
        )
        == 0
    )
    cfg = json.loads((torch_out / "quant_config.json").read_text())
    assert cfg["mode"] == "qat" and cfg["kwargs"]["bitwidth_overrides"] == {"first": 16}
    # eval: float, the reloaded quantized model and an ONNX file agree with what quantize measured
    p = xnnq(
        *FAST,
        "eval",
        *model,
        "--quant-dir",
        str(out),
        "--onnx",
        str(out / "model_qdq.onnx"),
        "--json",
        str(tmp_path / "eval.json"),
    )
    e = json.loads((tmp_path / "eval.json").read_text())
    assert e["quant_accuracy"] == pytest.approx(s["quant_accuracy"])
    assert e["float_accuracy"] == pytest.approx(s["float_accuracy"])
    assert e["onnx_accuracy"][str(out / "model_qdq.onnx")] == pytest.approx(s["onnx"]["qdq"]["accuracy"])
    # analyze the saved model
    p = xnnq(
        *FAST,
        "analyze",
        *model,
        "--quant-dir",
        str(out),
        "--analysis-images",
        "16",
        "--sensitivity-batches",
        "1",
        "--target-drop",
        "0.5",
        "--out",
        str(tmp_path / "an"),
    )
    assert "most sensitive" in p.stdout
    rep = json.loads((tmp_path / "an" / "report.json").read_text())
    assert {r["name"] for r in rep["layers"]} >= {"conv1", "conv2", "conv3", "fc"}
    assert len(list((tmp_path / "an").glob("*.png"))) == 3


@pytest.mark.slow
def test_bad_arguments(tiny_data, tmp_path, capsys):
    p = xnnq(
        "quantize",
        "--model",
        "no_such_net",
        "--data",
        str(tiny_data),
        "--mode",
        "ptq",
        "--out",
        str(tmp_path),
        check=False,
    )
    assert p.returncode == 2 and "no_such_net" in p.stderr and "torchvision" in p.stderr
    # the rest in this process: same parser, same error handling
    with pytest.raises(SystemExit) as e:
        main(["quantize", "--model", "resnet20", "--mode", "fast", "--out", str(tmp_path)])
    assert e.value.code == 2 and "invalid choice: 'fast'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2 and "COMMAND" in capsys.readouterr().err
    assert main(["eval", "--model", "resnet20", "--data", str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert (
        main(
            [
                "eval",
                "--model",
                "xnnq.demo:tiny_cnn",
                "--data",
                str(tiny_data),
                "--weights",
                str(tmp_path / "none.pt"),
            ]
        )
        == 2
    )
    assert "--weights" in capsys.readouterr().err
    assert (
        main(
            [
                "analyze",
                "--model",
                "xnnq.demo:tiny_cnn",
                "--data",
                str(tiny_data),
                "--quant-dir",
                str(tmp_path),
                "--out",
                str(tmp_path / "a"),
            ]
        )
        == 2
    )
    assert "quant_config.json" in capsys.readouterr().err
    assert main(["eval", "--model", "xnnq.nope:x", "--data", str(tiny_data)]) == 2
    assert "cannot import module 'xnnq.nope'" in capsys.readouterr().err
    bad_target = ["quantize", "--model", "xnnq.demo:tiny_cnn", "--data", str(tiny_data), "--mode", "ptq"]
    assert main([*bad_target, "--target", "TDA5", "--out", str(tmp_path / "t")]) == 2
    assert "--target: unknown TIDL target 'TDA5'; known targets: TDA4VM" in capsys.readouterr().err


@pytest.mark.slow
def test_quantize_for_a_chip(tiny_data, tmp_path):
    """``--target``: the chip's numerics and formats (AM69A: QDQ only; a 16-bit layer goes through TIDL's
    quantization-parameters file), kept in the saved config, so ``eval --quant-dir`` rebuilds the same model."""
    model = ["--model", "xnnq.demo:tiny_cnn", "--data", str(tiny_data), "--batch-size", "16"]
    out = tmp_path / "am69a"
    args = ["--no-progress", "quantize", *model, "--target", "am69a", "--mode", "ptq", "--calib-images", "32"]
    assert main([*args, "--sixteen-bit", "first", "--analysis-images", "0", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("model_*")) == [
        "model_qdq.onnx",
        "model_qdq.quant_params.prototxt",
        "model_qdq.tidl.json",
    ]
    cfg = json.loads((out / "quant_config.json").read_text())
    assert cfg["kwargs"]["target"] == "AM69A" and "per_channel_q" not in cfg["kwargs"]  # the chip's numerics
    opts = json.loads((out / "model_qdq.tidl.json").read_text())
    assert opts["target"] == "AM69A" and opts["flow"] == "quant_params"
    s = json.loads((out / "summary.json").read_text())
    assert s["target"] == "AM69A" and set(s["onnx"]) == {"qdq"}
    e_json = tmp_path / "eval.json"
    assert main(["--no-progress", "eval", *model, "--quant-dir", str(out), "--json", str(e_json)]) == 0
    assert json.loads(e_json.read_text())["quant_accuracy"] == pytest.approx(s["quant_accuracy"])


@pytest.mark.slow
def test_qat_with_learned_ranges(tiny_data, tmp_path, capsys):
    """``--range-learning tqt``: the wrapper learns its thresholds (kept in the saved config and state), ``eval
    --quant-dir`` rebuilds the same model, and PTQ refuses the option, naming --mode qat."""
    model = ["--model", "xnnq.demo:tiny_cnn", "--data", str(tiny_data), "--batch-size", "16"]
    out = tmp_path / "tqt"
    args = ["--no-progress", "quantize", *model, "--mode", "qat", "--range-learning", "tqt"]
    assert main([*args, "--analysis-images", "0", "--out", str(out)]) == 0
    cfg = json.loads((out / "quant_config.json").read_text())
    assert cfg["kwargs"]["range_learning"] == "tqt"
    import torch

    state = torch.load(out / "quant_state.pt", weights_only=True)
    assert sum(k.endswith("learned_range.log2_t") for k in state) >= 4
    s = json.loads((out / "summary.json").read_text())
    e_json = tmp_path / "eval.json"
    assert main(["--no-progress", "eval", *model, "--quant-dir", str(out), "--json", str(e_json)]) == 0
    assert json.loads(e_json.read_text())["quant_accuracy"] == pytest.approx(s["quant_accuracy"])
    ptq = ["--no-progress", "quantize", *model, "--mode", "ptq", "--range-learning", "tqt"]
    assert main([*ptq, "--out", str(tmp_path / "ptq")]) == 2
    assert "use it with --mode qat" in capsys.readouterr().err


def test_help_is_complete(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    top = capsys.readouterr().out
    assert e.value.code == 0 and all(c in top for c in ("demo", "quantize", "eval", "analyze"))
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    q = capsys.readouterr().out
    for opt in (
        "--model",
        "--weights",
        "--data",
        "--mode",
        "--epochs",
        "--out",
        "--sixteen-bit",
        "--per-channel",
    ):
        assert opt in q


@pytest.mark.slow
def test_python_m_runs_the_same_command_line():
    """``python -m xnnq.cli`` (the package's ``__main__``) is the console script's ``main``."""
    proc = subprocess.run(
        [sys.executable, "-m", "xnnq.cli", "--help"], capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr
    assert all(c in proc.stdout for c in ("demo", "quantize", "eval", "analyze"))
