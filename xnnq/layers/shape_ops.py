"""Range-preserving tensor ops written as functionals, turned into modules by the graph surgery.

They never get a quantizer of their own: their output is on the grid of their input.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class Pad(nn.Module):
    """``F.pad(x, pad, mode, value)``."""

    def __init__(self, pad: tuple[int, ...], mode: str = "constant", value: float | None = None):
        super().__init__()
        self.pad, self.mode, self.value = tuple(pad), mode, value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, self.pad, self.mode, self.value)

    def extra_repr(self) -> str:
        return f"pad={self.pad}, mode={self.mode!r}, value={self.value}"


class Slice(nn.Module):
    """``x[index]`` with a constant index of slices / ints / Ellipsis / None."""

    def __init__(self, index: Any):
        super().__init__()
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[self.index]

    def extra_repr(self) -> str:
        return f"index={self.index}"


class Reshape(nn.Module):
    """``x.reshape(batch, *shape)``: the batch dimension stays dynamic."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)

    def extra_repr(self) -> str:
        return f"shape=(N, {', '.join(map(str, self.shape))})"


class ChannelShuffle(nn.Module):
    """``F.channel_shuffle(x, groups)`` as reshape, transpose, reshape: the same values in the same order, in the
    ops ONNX has (torch.onnx has no export of ``aten::channel_shuffle``). ``x`` is ``(N, C, *spatial)``."""

    def __init__(self, groups: int):
        super().__init__()
        self.groups = int(groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(1, (self.groups, -1)).transpose(1, 2).flatten(1, 2)

    def extra_repr(self) -> str:
        return f"groups={self.groups}"
