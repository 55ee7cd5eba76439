"""Resize with constant scale factors, so the export is one clean ``Resize`` node."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def resize_with(
    x: torch.Tensor,
    scale_factor: float | tuple[float, ...],
    mode: str = "nearest",
    align_corners: bool | None = None,
) -> torch.Tensor:
    """``F.interpolate`` by constant ``scale_factor`` (no size arithmetic on shapes in the graph)."""
    return F.interpolate(
        x, scale_factor=scale_factor, mode=mode, align_corners=align_corners, recompute_scale_factor=False
    )


class ResizeWith(nn.Module):
    """Module form of :func:`resize_with`."""

    def __init__(
        self,
        scale_factor: float | tuple[float, ...],
        mode: str = "nearest",
        align_corners: bool | None = None,
    ):
        super().__init__()
        if mode in ("nearest", "area"):
            align_corners = None
        self.scale_factor = (
            tuple(float(s) for s in scale_factor)
            if isinstance(scale_factor, (tuple, list))
            else float(scale_factor)
        )
        self.mode, self.align_corners = mode, align_corners

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return resize_with(x, self.scale_factor, self.mode, self.align_corners)

    def extra_repr(self) -> str:
        return f"scale_factor={self.scale_factor}, mode={self.mode!r}, align_corners={self.align_corners}"
