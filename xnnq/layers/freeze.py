"""Explicit switches over every quantizer of a model: range freezing (``train()``/``eval()`` never change
it; learned thresholds included), quantization on/off, the rounding mode."""

from __future__ import annotations

from torch import nn

from .pact2 import PACT2
from .rounding import Rounding, as_rounding
from .tqt import LearnedRange


def _set(model: nn.Module, frozen: bool) -> int:
    n = 0
    for m in model.modules():
        if isinstance(m, PACT2):
            m.frozen = frozen
            n += 1
        elif isinstance(m, LearnedRange):
            m.frozen = frozen
    return n


def freeze_quant_range(model: nn.Module) -> int:
    """Stop updating every activation range in ``model`` (and every learned threshold: its value in force is
    kept whatever the optimizer still does to it); returns how many activation quantizers were frozen."""
    return _set(model, True)


def unfreeze_quant_range(model: nn.Module) -> int:
    """Resume range tracking (in training mode) for every activation quantizer in ``model``, and learning
    of learned thresholds (from their frozen values)."""
    return _set(model, False)


def set_quant_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch fake quantization of activations and weights on or off (off: the float model's function)."""
    for m in model.modules():
        if hasattr(m, "quant_enabled"):
            m.quant_enabled = enabled


def set_rounding(model: nn.Module, rounding: Rounding | str) -> int:
    """Round every activation quantizer of ``model`` with ``rounding`` (:mod:`xnnq.layers.rounding`):
    ``"tidl"`` (the default: what TIDL computes) or ``"half_even"`` (what onnxruntime computes for the
    exported QDQ file), ``"half_up"``, ``"half_away"``, ``"floor"``. Returns how many quantizers changed."""
    mode = as_rounding(rounding)
    n = 0
    for m in model.modules():
        if isinstance(m, PACT2):
            m.rounding = mode
            n += 1
    return n
