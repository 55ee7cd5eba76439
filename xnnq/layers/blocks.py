"""Modules for the tensor operators that change a range, so each can carry its own quantizer."""

from __future__ import annotations

import torch
from torch import nn


class AddBlock(nn.Module):
    """``x + y`` (and ``x + y + ...``) as a module."""

    def forward(self, x: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
        for o in others:
            x = x + o
        return x


class MultBlock(nn.Module):
    """``x * y`` as a module (e.g. a squeeze-excitation gate)."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x * y


class CatBlock(nn.Module):
    """``torch.cat(tensors, dim)`` as a module."""

    def __init__(self, dim: int = 1):
        super().__init__()
        self.dim = dim

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        if len(tensors) == 1 and isinstance(tensors[0], (list, tuple)):
            tensors = tuple(tensors[0])
        return torch.cat(tensors, dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class ReduceMean(nn.Module):
    """``x.mean(dim, keepdim)`` as a module (a global average pool written as a mean)."""

    def __init__(self, dim: tuple[int, ...], keepdim: bool = False):
        super().__init__()
        self.dim, self.keepdim = tuple(dim), keepdim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(self.dim, keepdim=self.keepdim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, keepdim={self.keepdim}"
