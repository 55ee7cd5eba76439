"""Post-training calibration: histogram-based activation ranges, MSE weight clipping, bias correction."""
from .bias_correction import InputMean, weight_error_mean
from .calib_quant import CalibPACT2
from .histogram import Histogram
from .methods import METHODS, choose_range
from .module import QuantCalibrateModule
from .weight_clip import mse_weight_shift

__all__ = [
           "METHODS",
           "CalibPACT2",
           "Histogram",
           "InputMean",
           "QuantCalibrateModule",
           "choose_range",
           "mse_weight_shift",
           "weight_error_mean",
]
