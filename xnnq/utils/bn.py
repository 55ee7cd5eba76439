"""Freeze / unfreeze BatchNorm: use and keep the running statistics."""
from __future__ import annotations

from torch import nn

_BN = nn.modules.batchnorm._BatchNorm


def _wrapper(model: nn.Module):
    from ..quantize.wrapper import QuantBaseModule
    return model if isinstance(model, QuantBaseModule) else None


def freeze_bn(model: nn.Module) -> int:
    """Put every BatchNorm of ``model`` (wrapped or plain) in eval mode; returns how many.

    On an xnnq wrapper the freeze survives later ``train()`` calls (it is saved in the state dict). On a
    plain model it lasts until the next ``model.train()``.
    """
    w = _wrapper(model)
    if w is not None:
        w.bn_frozen = True
    n = 0
    for m in model.modules():
        if isinstance(m, _BN):
            m.train(False)
            n += 1
    return n


def unfreeze_bn(model: nn.Module) -> int:
    """Undo :func:`freeze_bn`: BatchNorm follows the model's mode again (batch statistics in training)."""
    w = _wrapper(model)
    if w is not None:
        w.bn_frozen = False
    n = 0
    for m in model.modules():
        if isinstance(m, _BN):
            m.train(model.training)
            n += 1
    return n
