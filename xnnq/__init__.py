"""xnnq: quantization-aware training, calibration and TIDL-ready export for PyTorch models."""
__version__ = "0.1.0"
