"""xnnq: quantization-aware training, calibration and TIDL-ready export for PyTorch models."""
from . import layers, utils
from .quantize import CaptureError, QuantTestModule, QuantTrainModule

__version__ = "0.1.0"
__all__ = ["QuantTrainModule", "QuantTestModule", "CaptureError", "layers", "utils"]
