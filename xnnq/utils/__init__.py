"""Utilities: BatchNorm freezing, export, checking, analysis."""
from .bn import freeze_bn, unfreeze_bn

__all__ = ["freeze_bn", "unfreeze_bn"]
