"""Post-training calibration: histogram-based activation ranges, MSE weight clipping, bias correction."""

from .bias_correction import InputMean, weight_error_mean
from .histogram import Histogram
from .methods import METHODS, choose_range
from .module import QuantCalibrateModule
from .observer import HistogramObserver, HistogramRanges
from .weight_clip import mse_weight_shift

__all__ = [
    "METHODS",
    "Histogram",
    "HistogramObserver",
    "HistogramRanges",
    "InputMean",
    "QuantCalibrateModule",
    "choose_range",
    "mse_weight_shift",
    "weight_error_mean",
]
