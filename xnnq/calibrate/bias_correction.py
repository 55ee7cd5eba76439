"""Bias correction: remove each layer's *own* weight-quantization error from its per-channel output mean.

For a conv/linear layer ``y = f(x; W) + b`` quantized to ``W_q``, the output mean moves by
``E[f(x; W_q) - f(x; W)] = f(E[x]; W_q - W)`` (``f`` is linear). With ``E[x]`` the mean over the
calibration batch of the layer's *float* input, kept per position (``C×H×W``, so zero padding at the
borders is exact), the correction per output channel is the spatial mean of ``f(E[x]; W_q - W)``; it is
subtracted from the folded bias (the layer's ``bias_correction`` buffer, so it is saved in the state dict
and exported with the bias). Weight quantization is deterministic: no second pass over the data is needed,
and no labels.

Difference from TI's v1 bias calibration (``QuantCalibrateModule`` of edgeai-torchvision v1): there the
correction of a layer is the difference between the float model's and the *quantized* model's output
mean, measured while the upstream layers are already quantized, and applied a little every batch. Its
correction therefore also absorbs the mean error that arrives from upstream (activation clipping and
upstream weights), mixed into every layer's bias along the network, and depends on the order and count of
batches. Here the float input is used, so each layer's correction is the mean error it causes itself,
computed once in closed form; upstream layers correct their own.
"""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist
from torch import nn

from ..layers import cpu_kernels
from ..layers.fused import c_kernels_ready


class InputMean(nn.Module):
    """Running mean over the batch dimension of a layer's input (a forward pre-hook; state not saved).

    ``hook`` is registered with ``layer.register_forward_pre_hook`` (on every layer that reads the same
    tensor, when they share one); it counts only in training mode, each tensor once per batch (layers
    sharing this mean see the same tensor). :meth:`new_batch` starts a batch.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("total", torch.zeros(0), persistent=False)
        self.register_buffer("count", torch.zeros((), dtype=torch.long), persistent=False)
        self._summed: tuple[weakref.ref, int] | None = None  # the tensor counted in this batch, its version

    def new_batch(self) -> None:
        """Forget which tensor was counted (a new forward pass of the model)."""
        self._summed = None

    def hook(self, module: nn.Module, args: tuple) -> None:
        if not self.training:
            return
        x = args[0]
        if self._summed is not None and self._summed[0]() is x:  # counted in this batch by another reader
            if x._version != self._summed[1]:
                raise RuntimeError(
                    "bias correction: a layer's input was changed in place between two layers that read it "
                    "(a hook?); calibrate with bias_correction=False, or without the hook"
                )
            return
        if self.total.shape != x.shape[1:]:
            if self.total.numel():
                raise ValueError(
                    f"{getattr(module, 'name', '') or type(module).__name__}: calibration inputs change "
                    f"shape ({tuple(self.total.shape)} -> {tuple(x.shape[1:])}); bias correction needs "
                    "calibration batches of one input size (or bias_correction=False)."
                )
            self.total = torch.zeros(x.shape[1:], dtype=torch.float64, device=x.device)
        # the batch summed in float32 (the input's dtype), accumulated in float64; in place (no module
        # attribute assignment per batch). On CPU one C pass does both, with torch's summation order.
        if cpu_kernels.add_row_sum_applies(x) and c_kernels_ready():
            cpu_kernels.add_row_sum(x, self.total, self.count)
        else:
            with torch.no_grad():
                self.total.add_(x.detach().sum(0))
                self.count.add_(x.shape[0])
        self._summed = (weakref.ref(x), x._version)

    def mean(self) -> torch.Tensor | None:
        """``E[x]`` per position (float64), or ``None`` if nothing was seen; summed over ranks under torch.distributed."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and self.total.numel():
            dist.all_reduce(self.total, op=dist.ReduceOp.SUM)
            dist.all_reduce(self.count, op=dist.ReduceOp.SUM)
        if not self.total.numel() or int(self.count) == 0:
            return None
        return self.total / self.count


def _channel_mean(y: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
        return y.mean(dim=[d for d in range(y.dim()) if d != 1])
    return y.reshape(-1, y.shape[-1]).mean(0)


@torch.no_grad()
def weight_error_mean(
    layer: nn.Module, mean_input: torch.Tensor, bn: nn.Module | None
) -> torch.Tensor | None:
    """Per-output-channel shift of ``layer``'s output mean caused by its weight quantization.

    ``layer`` is a :class:`~xnnq.layers.QuantConv2d` / ``QuantConvTranspose2d`` / ``QuantLinear``; its
    ``bias_correction`` is ignored here. ``None`` when the layer has no bias after folding.
    """
    saved = layer.bias_correction.clone()
    layer.bias_correction.zero_()
    try:
        w, b = layer.folded_weight_bias(bn)
        if b is None:
            return None
        wq = layer.quantize_weight(w)[0]
        dw = (wq - w).double()
        y = layer.layer_forward(mean_input.unsqueeze(0).to(dw.device), dw, None)
        return _channel_mean(y, layer).to(layer.bias_correction.dtype)
    finally:
        layer.bias_correction.copy_(saved)
