"""xnnq: quantization-aware training, calibration and TIDL-ready export for PyTorch models.

qmodel = xnnq.QuantTrainModule(model, dummy_input)      # QAT
qmodel = xnnq.QuantCalibrateModule(model, dummy_input)  # PTQ
xnnq.recipes.qat_finetune(qmodel, train_batches, epochs=1)  # the QAT recipe
xnnq.export_onnx(qmodel, dummy_input, "model.onnx", format="tidl" | "qdq")
"""

from . import layers, recipes, utils
from ._lazy import lazy_getattr
from .quantize import CaptureError, QuantTestModule, QuantTrainModule

__version__ = "0.1.0"  # the one version string: pyproject.toml reads it (setuptools dynamic version)

# names whose modules pull in onnx / onnxruntime: imported on first use
_LAZY = {
    "export_onnx": ("xnnq.export", "export_onnx"),
    "QuantCalibrateModule": ("xnnq.calibrate", "QuantCalibrateModule"),
}


__getattr__ = lazy_getattr(__name__, _LAZY)

__all__ = [
    "QuantTrainModule",
    "QuantTestModule",
    "QuantCalibrateModule",
    "CaptureError",
    "export_onnx",
    "layers",
    "recipes",
    "utils",
]
