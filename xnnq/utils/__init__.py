"""Utilities: BatchNorm freezing, export, checking, analysis."""
from .bn import freeze_bn, unfreeze_bn
from .schedule import apply_freeze_schedule

__all__ = ["freeze_bn", "unfreeze_bn", "apply_freeze_schedule"]
