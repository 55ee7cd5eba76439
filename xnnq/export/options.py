"""The JSON written beside an exported ONNX: TIDL compile options and the activation range table."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..targets import SCALE_TYPE_NP2, SCALE_TYPE_P2

PREQUANTIZED_OPTION = "advanced_options:prequantized_model"  # TIDL reads scales from an ONNX QDQ model
# TIDL's scale types (edgeai-tidl-tools examples/osrt_python/README.md, option table: 0 non-power-of-2,
# 1 power-of-2, 3 TF-Lite pre-quantized, 4 asymmetric per-channel): xnnq.targets' SCALE_TYPE_* constants
SCALE_TYPE_OPTION = "advanced_options:quantization_scale_type"
FEATURE_16BIT_OPTION = "advanced_options:output_feature_16bit_names_list"
PARAMS_16BIT_OPTION = "advanced_options:params_16bit_names_list"


def options_path(onnx_path: str | Path) -> Path:
    """``model.onnx`` → ``model.tidl.json``."""
    p = Path(onnx_path)
    return p.with_name(p.stem + ".tidl.json")


def untargeted_scale_type(fmt: str, weights_power2: bool, non_power2_activations: list[str]) -> int:
    """The ``quantization_scale_type`` of an export without a target that matches the model's scales:
    power-of-2 (1) when weights and activations all are, else non-power-of-2 (0). With a target,
    :func:`xnnq.targets.scale_type` decides.

    The float ("tidl") export is refused with non-power-of-2 activations: TIDL's calibration of a float
    model (``accuracy_level`` 0) supports non-power-of-2 scales for parameters but only power-of-2 scales for
    feature maps (edgeai-tidl-tools docs/tidl_fsg_quantization.md, B.1 Simple Calibration), so it would not
    compute what the model computes. TI's docs do not give the rule of its non-power-of-2 parameter scales;
    the "tidl" export ships the weights on xnnq's grid (``max |w| / (2^(b-1) - 1)``).
    """
    if fmt == "tidl" and non_power2_activations:
        names = non_power2_activations
        raise ValueError(
            f"export_onnx(format='tidl'): the activation quantizers {names[:5]}"
            f"{' ...' if len(names) > 5 else ''} have non-power-of-2 scales (power2_activation_range=False), "
            "but TIDL quantizes the feature maps of a float model with power-of-2 scales only "
            "(edgeai-tidl-tools docs/tidl_fsg_quantization.md, B.1), so it would not compute what this model "
            "computes. Build the wrapper with power2_activation_range=True, or export format='qdq' (TIDL "
            "reads the scales from the Q/DQ nodes)."
        )
    return SCALE_TYPE_P2 if weights_power2 and not non_power2_activations else SCALE_TYPE_NP2


def tidl_runtime_options(
    fmt: str,
    tensor_bits: int,
    feature_16bit: list[str],
    params_16bit: list[str],
    scale_type: int = SCALE_TYPE_P2,
) -> dict[str, Any]:
    """TIDL compile options for a QAT model without a target: no calibration (``accuracy_level`` 0) and the
    ``scale_type`` of :func:`untargeted_scale_type`; for QDQ, TIDL's pre-quantized-model switch (scales read
    from the Q/DQ nodes)."""
    opts: dict[str, Any] = {"tensor_bits": tensor_bits, "accuracy_level": 0, SCALE_TYPE_OPTION: scale_type}
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
