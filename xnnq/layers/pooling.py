"""Max pooling that keeps only its argmax indices for the backward.

``nn.MaxPool2d`` in training keeps its input for the backward, although the gradient needs only the
indices of the maxima (``aten.max_pool2d_with_indices_backward`` reads the input's sizes and layout, not its
values). In a float network the input is kept anyway (the ReLU before the pool keeps its output, the same
tensor); in the QAT graph the pool's input is a quantizer's output, which the quantizer does not keep (it
keeps a 1-byte mask), so the pool alone holds a full-size float copy (ResNet's stem: 4 bytes × 64 × 112 ×
112 per image). :class:`IndexMaxPool2d` keeps the indices only: same output, same gradient bit for bit
(tests/test_pooling.py, CPU: the backward is given an uninitialised tensor of the input's sizes and
strides; on CUDA the same ATen kernel signature, not tested here).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.utils import _pair


class _MaxPool2dIndices(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel, stride, padding, dilation, ceil_mode):
        out, idx = torch.ops.aten.max_pool2d_with_indices(x, kernel, stride, padding, dilation, ceil_mode)
        ctx.save_for_backward(idx)
        ctx.pool = (kernel, stride, padding, dilation, ceil_mode)
        ctx.input = (x.shape, x.stride(), x.dtype, x.device)
        return out

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        shape, stride, dtype, device = ctx.input
        like = torch.empty_strided(shape, stride, dtype=dtype, device=device)  # sizes and layout only
        g = torch.ops.aten.max_pool2d_with_indices_backward(grad, like, *ctx.pool, idx)
        return g, None, None, None, None, None


class IndexMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` (same arguments, no state) that, when its input requires grad, keeps the argmax
    indices for the backward instead of the input. Elsewhere (no grad, ``return_indices``, tracing or ONNX
    export, not 4-d) it is ``nn.MaxPool2d``."""

    @classmethod
    def from_float(cls, pool: nn.MaxPool2d) -> IndexMaxPool2d:
        return cls(
            pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.return_indices, pool.ceil_mode
        )

    def forward(self, x: torch.Tensor):
        if (
            self.return_indices
            or not (torch.is_grad_enabled() and x.requires_grad)
            or x.dim() != 4
            or torch.jit.is_tracing()
            or torch.onnx.is_in_onnx_export()
        ):
            return super().forward(x)
        stride = [] if self.stride is None else list(_pair(self.stride))
        return _MaxPool2dIndices.apply(
            x,
            list(_pair(self.kernel_size)),
            stride,
            list(_pair(self.padding)),
            list(_pair(self.dilation)),
            self.ceil_mode,
        )
