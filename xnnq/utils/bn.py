"""Freeze / unfreeze BatchNorm: use and keep the running statistics."""

from __future__ import annotations

from torch import nn

_BN = nn.modules.batchnorm._BatchNorm


def _set_frozen(model: nn.Module, frozen: bool) -> int:
    from ..quantize.wrapper import QuantBaseModule

    if isinstance(model, QuantBaseModule):
        model.bn_frozen = frozen
    bns = [m for m in model.modules() if isinstance(m, _BN)]
    for m in bns:
        m.train(False if frozen else model.training)
    return len(bns)


def freeze_bn(model: nn.Module) -> int:
    """Put every BatchNorm of ``model`` (wrapped or plain) in eval mode; returns how many.

    On an xnnq wrapper the freeze survives later ``train()`` calls (it is saved in the state dict). On a
    plain model it lasts until the next ``model.train()``.
    """
    return _set_frozen(model, True)


def unfreeze_bn(model: nn.Module) -> int:
    """Undo :func:`freeze_bn`: BatchNorm follows the model's mode again (batch statistics in training)."""
    return _set_frozen(model, False)
