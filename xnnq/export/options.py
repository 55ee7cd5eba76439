"""The JSON written beside an exported ONNX: TIDL compile options and the activation range table."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

PREQUANTIZED_OPTION = "advanced_options:prequantized_model"  # TIDL reads scales from an ONNX QDQ model
SCALE_TYPE_OPTION = "advanced_options:quantization_scale_type"  # 1: power-of-2 scales
FEATURE_16BIT_OPTION = "advanced_options:output_feature_16bit_names_list"
PARAMS_16BIT_OPTION = "advanced_options:params_16bit_names_list"


def options_path(onnx_path: str | Path) -> Path:
    """``model.onnx`` → ``model.tidl.json``."""
    p = Path(onnx_path)
    return p.with_name(p.stem + ".tidl.json")


def tidl_runtime_options(
    fmt: str, tensor_bits: int, feature_16bit: list[str], params_16bit: list[str]
) -> dict[str, Any]:
    """TIDL compile options for a QAT model: no calibration (``accuracy_level`` 0), power-of-2 scales; for
    QDQ, TIDL's pre-quantized-model switch (scales read from the Q/DQ nodes)."""
    opts: dict[str, Any] = {"tensor_bits": tensor_bits, "accuracy_level": 0, SCALE_TYPE_OPTION: 1}
    if fmt == "qdq":
        opts[PREQUANTIZED_OPTION] = 1
    if feature_16bit:
        opts[FEATURE_16BIT_OPTION] = ",".join(feature_16bit)
    if params_16bit:
        opts[PARAMS_16BIT_OPTION] = ",".join(params_16bit)
    return opts


def write_options(path: str | Path, content: dict[str, Any]) -> Path:
    out = options_path(path)
    text = json.dumps(content, indent=2)
    text = re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text)
    out.write_text(text + "\n")
    return out


def read_options(onnx_path: str | Path) -> dict[str, Any]:
    """The JSON written by :func:`xnnq.export_onnx` beside ``onnx_path``."""
    p = options_path(onnx_path)
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found: it is written by xnnq.export_onnx beside the .onnx file")
    return json.loads(p.read_text())


def split_names(value: str | None) -> list[str]:
    """TIDL's name lists are comma (or space) separated strings."""
    if not value:
        return []
    return [s for s in value.replace(",", " ").split() if s]
