"""Freeze BatchNorm and activation ranges by an epoch number the caller passes (no hidden counters)."""

from __future__ import annotations

from torch import nn

from ..layers.freeze import freeze_quant_range, unfreeze_quant_range
from .bn import freeze_bn, unfreeze_bn


def apply_freeze_schedule(
    model: nn.Module, epoch: int, *, freeze_bn_epoch: int | None = None, freeze_range_epoch: int | None = None
) -> dict[str, bool]:
    """Freeze BN from ``freeze_bn_epoch`` on and ranges from ``freeze_range_epoch`` on (``None``: never).

    Call it at the start of every epoch with the epoch index you are about to train; it is idempotent and
    also un-freezes when ``epoch`` is before the thresholds (e.g. after resuming at an earlier epoch).
    Returns the state applied: ``{"bn_frozen": ..., "range_frozen": ...}``.
    """
    bn = freeze_bn_epoch is not None and epoch >= freeze_bn_epoch
    rng = freeze_range_epoch is not None and epoch >= freeze_range_epoch
    (freeze_bn if bn else unfreeze_bn)(model)
    (freeze_quant_range if rng else unfreeze_quant_range)(model)
    return {"bn_frozen": bn, "range_frozen": rng}
