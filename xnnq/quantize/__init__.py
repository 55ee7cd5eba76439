"""The quantization pipeline: capture → surgery → plan → build, and the wrappers."""

from .capture import CaptureError
from .config import QuantConfig
from .evaluation import QuantTestModule
from .plan import ActSpot, Plan, WeightSpot
from .train import QuantTrainModule
from .wrapper import QuantBaseModule

__all__ = [
    "QuantConfig",
    "QuantTrainModule",
    "QuantTestModule",
    "QuantBaseModule",
    "CaptureError",
    "Plan",
    "ActSpot",
    "WeightSpot",
]
