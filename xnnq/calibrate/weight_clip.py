"""MSE-optimal power-of-2 weight clipping: choose how many times to halve the max rule's weight range."""

from __future__ import annotations

import torch
from torch import nn

from ..layers.fake_quant import fake_quantize, quant_bounds, weight_scale


@torch.no_grad()
def mse_weight_shift(layer: nn.Module, bn: nn.Module | None, max_shift: int = 2) -> torch.Tensor:
    """``weight_range_shift`` for ``layer`` (per tensor, or per channel if the layer is per-channel).

    Candidates: the scale of the max rule divided by ``2^0 .. 2^max_shift``; the one with the least
    squared error ``sum (q(W) - W)^2`` of the folded (and outlier-constrained) weights wins. Shift 0 is
    the max rule, so the result is never worse than it on this objective.
    """
    w = layer.constrain(layer.folded_weight_bias(bn)[0]).detach()
    axis = layer.weight_axis()
    base = weight_scale(w, layer.weight_bits, axis, layer.power2)
    qmin, qmax = quant_bounds(layer.weight_bits, True)
    dims = [d for d in range(w.dim()) if d != axis] if axis is not None else list(range(w.dim()))
    errs = torch.stack(
        [
            ((fake_quantize(w, base / 2**k, qmin, qmax, axis) - w) ** 2).sum(dim=dims)
            for k in range(max_shift + 1)
        ]
    )
    return errs.argmin(0)
