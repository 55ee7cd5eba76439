"""Per-layer quantization analysis: SQNR, ranges, clipping, number formats, sensitivity; plots."""

from .analyze import analyze
from .result import AnalysisResult, LayerStats
from .schemes import quantize_float, quantize_int, quantize_pot, quantize_scheme
from .suggest import estimated_drop, suggest_16bit

__all__ = [
    "AnalysisResult",
    "LayerStats",
    "analyze",
    "estimated_drop",
    "quantize_float",
    "quantize_int",
    "quantize_pot",
    "quantize_scheme",
    "suggest_16bit",
]
