"""Quantized modules and fake-quantization primitives."""

from .blocks import AddBlock, CatBlock, MultBlock, ReduceMean
from .fake_quant import activation_scale, fake_quantize, pow2_ceil, quant_bounds, quantize_bias, weight_scale
from .freeze import freeze_quant_range, set_quant_enabled, set_rounding, unfreeze_quant_range
from .observer import RangeObserver
from .pact2 import PACT2
from .quant_weight import QUANT_WEIGHT_LAYERS, QuantConv2d, QuantConvTranspose2d, QuantLinear
from .range_tracker import RangeTracker
from .resize import ResizeWith, resize_with
from .rounding import Rounding
from .shape_ops import ChannelShuffle, Pad, Reshape, Slice
from .tqt import LearnedRange, tqt_fake_quantize

__all__ = [
    "AddBlock",
    "CatBlock",
    "MultBlock",
    "ReduceMean",
    "ResizeWith",
    "resize_with",
    "ChannelShuffle",
    "Pad",
    "Reshape",
    "Slice",
    "PACT2",
    "RangeObserver",
    "RangeTracker",
    "QuantConv2d",
    "QuantConvTranspose2d",
    "QuantLinear",
    "QUANT_WEIGHT_LAYERS",
    "fake_quantize",
    "quantize_bias",
    "quant_bounds",
    "pow2_ceil",
    "activation_scale",
    "weight_scale",
    "freeze_quant_range",
    "unfreeze_quant_range",
    "set_quant_enabled",
    "set_rounding",
    "Rounding",
    "LearnedRange",
    "tqt_fake_quantize",
]
