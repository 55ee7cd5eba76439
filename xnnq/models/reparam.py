"""Structural re-parameterization: turn multi-branch training blocks into one conv per block.

A block that can be re-parameterized derives from :class:`Reparameterizable` and returns its deploy
form from :meth:`Reparameterizable.deploy_module`. :func:`reparameterize` replaces every such block of
a model (a copy) by its deploy form. The fused kernels use the BatchNorm running statistics, so the
deploy model computes the same function as the training model in **eval** mode.

The kernel arithmetic the blocks share lives here: padding a kernel to a larger odd size and the kernel
of an identity branch; folding a BatchNorm into a kernel is :func:`xnnq.layers.bn_fold.fold_bn` (the
quantized layers' formula), re-exported here.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers.bn_fold import fold_bn


class Reparameterizable(nn.Module):
    """A block with a single-conv deploy form (the fused conv followed by the block's activation)."""

    def deploy_module(self) -> nn.Module:  # pragma: no cover - interface
        """A new module computing the same function as ``self`` in eval mode, with one conv."""
        raise NotImplementedError


def pad_kernel(weight: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad a k×k kernel (k odd, k ≤ size) to size×size, centred."""
    k = weight.shape[-1]
    if (size - k) % 2:
        raise ValueError(f"cannot centre a {k}x{k} kernel in {size}x{size}: sizes must both be odd")
    p = (size - k) // 2
    return F.pad(weight, (p, p, p, p))


def identity_kernel(channels: int, groups: int, size: int, like: torch.Tensor | None = None) -> torch.Tensor:
    """Kernel (channels × channels/groups × size × size) of a grouped conv that is the identity."""
    per_group = channels // groups
    w = torch.zeros(
        channels,
        per_group,
        size,
        size,
        dtype=like.dtype if like is not None else None,
        device=like.device if like is not None else None,
    )
    idx = torch.arange(channels, device=w.device)
    w[idx, idx % per_group, size // 2, size // 2] = 1.0
    return w


def fused_conv(like: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    """A biased conv with the geometry (stride, padding, groups, ...) of ``like`` and the given tensors."""
    k = weight.shape[-1]
    conv = nn.Conv2d(
        like.in_channels,
        like.out_channels,
        k,
        like.stride,
        k // 2 * like.dilation[0],
        like.dilation,
        like.groups,
        bias=True,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        conv.weight.copy_(weight)
        conv.bias.copy_(bias)
    return conv


def deploy_sequential(conv: nn.Conv2d, act: nn.Module) -> nn.Sequential:
    """The deploy form of a block: ``Sequential(conv=..., act=...)`` (named children for readable graphs)."""
    seq = nn.Sequential()
    seq.add_module("conv", conv)
    seq.add_module("act", copy.deepcopy(act))
    return seq


__all__ = [
    "Reparameterizable",
    "deploy_sequential",
    "fold_bn",
    "fused_conv",
    "identity_kernel",
    "pad_kernel",
    "reparameterize",
]


def _blocks(model: nn.Module) -> Iterator[tuple[nn.Module, str, Reparameterizable]]:
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, Reparameterizable):
                yield parent, name, child


@torch.no_grad()
def reparameterize(model: nn.Module) -> nn.Module:
    """The deploy form of ``model``: a copy with every :class:`Reparameterizable` block fused to one conv.

    The input model is not modified. The result computes the eval-mode function of ``model`` (BatchNorm
    running statistics are folded in) and keeps ``model.training``. Blocks nested inside other blocks
    are handled because the outermost block builds its deploy form from its own branches.
    """
    deploy = copy.deepcopy(model)
    for parent, name, block in list(_blocks(deploy)):
        setattr(parent, name, block.deploy_module())
    deploy.train(model.training)
    return deploy
