"""xnnq: quantization-aware training, calibration and TIDL-ready export for PyTorch models.

    qmodel = xnnq.QuantTrainModule(model, dummy_input)      # QAT
    qmodel = xnnq.QuantCalibrateModule(model, dummy_input)  # PTQ
    xnnq.export_onnx(qmodel, dummy_input, "model.onnx", format="tidl" | "qdq")
"""
from importlib import import_module
from typing import Any

from . import layers, utils
from .quantize import CaptureError, QuantTestModule, QuantTrainModule

__version__ = "0.1.0"

# names whose modules pull in onnx / onnxruntime: imported on first use
_LAZY = {
    "export_onnx": ("xnnq.export", "export_onnx"),
    "QuantCalibrateModule": ("xnnq.calibrate", "QuantCalibrateModule"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(import_module(module), attr)
    raise AttributeError(f"module 'xnnq' has no attribute {name!r}")


__all__ = ["QuantTrainModule", "QuantTestModule", "QuantCalibrateModule", "CaptureError", "export_onnx", "layers", "utils"]
