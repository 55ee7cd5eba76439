"""BatchNorm folding: the one formula for the quantized layers, re-parameterization and CLE.

``bn(conv(x; W, b)) = conv(x; W·c, β + (b − μ)·c)`` with ``c = γ / sqrt(σ² + ε)`` per output channel
(``γ = 1``, ``β = 0`` without affine parameters), from the running statistics (eval mode).
"""

from __future__ import annotations

import torch
from torch import nn


def bn_scale(bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """``c = γ / sqrt(running_var + eps)`` per channel (``1 / sqrt(...)`` without affine parameters)."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"{bn}: BatchNorm without running statistics cannot be folded "
            "(construct it with track_running_stats=True)"
        )
    # a training BatchNorm changes its running statistics in place during the step: the factor is computed
    # outside torch.compile's graphs then; frozen or evaluating, inside them (no graph break per layer)
    inv_std = (_inv_std_outside_graph if bn.training else _inv_std)(bn.running_var, bn.eps)
    return bn.weight * inv_std if bn.affine else inv_std


def _inv_std(running_var: torch.Tensor, eps: float) -> torch.Tensor:
    """``1 / sqrt(running_var + eps)``."""
    return torch.rsqrt(running_var + eps)


# a compiled graph may keep ``running_var`` itself for its backward, and a training BatchNorm updates it in place
# before the backward runs (autograd's "modified by an inplace operation" error in a compiled QAT step)
_inv_std_outside_graph = torch.compiler.disable(_inv_std)


def fold_bn(
    weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.modules.batchnorm._BatchNorm, axis: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``bn(layer(x))`` for a conv/linear layer with ``weight`` / ``bias`` (bias may be None);
    ``axis``: the weight's output-channel axis (1 for a transposed convolution)."""
    c = bn_scale(bn)
    b = bias if bias is not None else torch.zeros_like(bn.running_mean)
    shift = bn.bias if bn.affine else torch.zeros_like(c)
    view = [1] * weight.dim()
    view[axis] = -1
    return weight * c.view(view), shift + (b - bn.running_mean) * c
