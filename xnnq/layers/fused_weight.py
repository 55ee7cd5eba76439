"""The weight path of a quantized conv/linear layer on CPU in a few C passes instead of some sixty small torch ops.

:class:`~xnnq.layers.quant_weight.QuantConv2d` and ``QuantLinear`` quantize their folded weights every training
step: the outlier bound, the max, the power-of-2 scale, the clipped fake-quantization and (BatchNorm in training)
the division by ``c = γ / sqrt(running_var + eps)``, and the backward of each. On the small tensors of a weight
each torch op costs its dispatch more than its arithmetic. Here, for float32 CPU weights with the default
options (power-of-2 scales, no learned range; with or without outlier clipping):

* torch computes what has an order-dependent sum: the folded weight ``W·c`` and its standard deviation (the
  outlier bound ``outlier_ratio·σ``, with ``constrain_weights``), and in the backward the per-channel sums of
  the gradient of ``c``;
* one C pass counts the weights beyond the bound and takes the max per channel (the scales follow,
  :func:`~xnnq.layers.fake_quant.weight_scale_from_max` exactly), one writes the quantized weight (``q(W·c) / c``
  with BatchNorm in training), and the backward recomputes the masks from ``W`` and ``c`` and writes the
  gradient of ``W`` and the two products whose sums are the gradient of ``c``.

Values and gradients are those of the torch ops, bit for bit (tests/test_fused_weight.py): the same float
operations in the same order per element, the same reductions by torch. Nothing weight-sized is kept for the
backward (it recomputes from ``W`` and ``c``), so the large layers' recomputation (``RECOMPUTE_MIN_NUMEL``) is
not needed on this path. A weight holding NaN or ±inf, learned ranges, ``power2=False``, other dtypes or
devices, and ``XNNQ_FUSED=0`` take the torch ops.
"""

from __future__ import annotations

import ctypes
import math

import torch

from . import cpu_kernels
from .fake_quant import _mask_bounds, quant_bounds
from .fused import c_kernels_ready


def applies(layer, w: torch.Tensor) -> bool:
    """Whether ``layer``'s weight path can run here for the folded weight ``w``."""
    return (
        layer.power2
        and layer.out_axis == 0  # rows are output channels (not a transposed convolution's [in, out, ...])
        and layer.learned_range is None
        and w.dtype == torch.float32
        and w.device.type == "cpu"
        and w.numel() > 0
        and layer.weight.is_contiguous()
        and c_kernels_ready()
    )


def _scales(layer, w: torch.Tensor) -> tuple[float, torch.Tensor] | None:
    """(outlier bound, scale) of the folded weight ``w`` (detached, contiguous), or ``None`` when it holds a NaN
    or an infinity."""
    rows = w.shape[0]
    t = float(layer.outlier_bound(w)) if layer.constrain_weights else math.inf  # inf: nothing clipped
    scale = torch.empty(rows if layer.per_channel else (), dtype=torch.float32)
    shift = layer.weight_range_shift.contiguous()
    bound = (ctypes.c_float * 1)()
    bad = cpu_kernels.library().xnnq_wq_scale(
        w.data_ptr(),
        rows,
        w.numel() // rows,
        t,
        max(1, rows // 16),
        int(layer.per_channel),
        layer.weight_bits,
        shift.data_ptr(),
        scale.data_ptr(),
        bound,
        torch.get_num_threads(),
    )
    return None if bad else (bound[0], scale)


_consts_cache: dict[int, tuple[float, float, float, float]] = {}


def _consts(bits: int) -> tuple[float, float, float, float]:
    """``(qmin, qmax, lo, hi)`` of signed ``bits``-bit weights as floats (a plain dict: ``torch.compile`` traces
    it without the warning a ``functools`` cache gets)."""
    c = _consts_cache.get(bits)
    if c is None:
        qmin, qmax = quant_bounds(bits, True)
        c = _consts_cache[bits] = (float(qmin), float(qmax), *_mask_bounds(qmin, qmax))
    return c


def _args(layer) -> tuple[bool, int, bool]:
    """(per channel, bits, code 0 as +0.0): without outlier clipping the torch ops are ``fake_quantize``'s, whose
    code 0 dequantizes to +0.0; with it, ``_ClipFakeQuantSTE``'s rounding keeps -0.0."""
    return layer.per_channel, layer.weight_bits, not layer.constrain_weights


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class _WeightQuant(torch.autograd.Function):
    """``q(w)`` (``W`` and ``c`` None) or ``where(c == 0, W, q(W·c) / c)`` with ``w = W·c`` given (detached)."""

    @staticmethod
    def forward(ctx, W, c, w, bound, scale, per_channel, bits, plus_zero):
        out = torch.empty_like(w)
        rows = w.shape[0]
        cpu_kernels.library().xnnq_wq_forward(
            w.data_ptr(),
            _ptr(W),
            _ptr(c),
            rows,
            w.numel() // rows,
            bound,
            scale.data_ptr(),
            int(per_channel),
            int(plus_zero),
            *_consts(bits),
            out.data_ptr(),
            torch.get_num_threads(),
        )
        ctx.save_for_backward(W, c, w if c is None else None, scale)
        ctx.args = (bound, int(per_channel), bits, int(plus_zero))
        return out

    @staticmethod
    def backward(ctx, grad):
        W, c, w, scale = ctx.saved_tensors
        bound, per_channel, bits, plus_zero = ctx.args
        g = grad.contiguous()
        gw = torch.empty_like(g)
        p1 = p2 = None
        if c is not None:
            p1, p2 = torch.empty_like(g), torch.empty_like(g)
        rows = g.shape[0]
        cpu_kernels.library().xnnq_wq_backward(
            g.data_ptr(),
            _ptr(w),
            _ptr(W),
            _ptr(c),
            rows,
            g.numel() // rows,
            bound,
            scale.data_ptr(),
            per_channel,
            plus_zero,
            *_consts(bits),
            gw.data_ptr(),
            _ptr(p1),
            _ptr(p2),
            torch.get_num_threads(),
        )
        if c is None:  # q(w): the gradient of w
            return None, None, gw, None, None, None, None, None
        grad_c = p1.sum_to_size(c.shape) + p2.sum_to_size(c.shape)
        return gw, grad_c, None, None, None, None, None, None


def quantize_weight(
    layer, w: torch.Tensor, scale_floor: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``layer.quantize_weight(w, scale_floor)`` (quantized weight, scale) in the C passes, or ``None`` where
    they do not apply (the caller then runs the torch ops)."""
    if not applies(layer, w):
        return None
    w = w.contiguous()
    with torch.no_grad():
        found = _scales(layer, w.detach())
    if found is None:
        return None
    bound, scale = found
    if scale_floor is not None:
        scale = torch.maximum(scale, scale_floor.to(scale.dtype))
    return _WeightQuant.apply(None, None, w, bound, scale, *_args(layer)), scale


def train_weight(layer, c: torch.Tensor) -> torch.Tensor | None:
    """``layer._train_weight(c)`` (BatchNorm in training: ``q(W·c) / c``, ``W`` where ``c == 0``) in the C
    passes, or ``None`` where they do not apply. ``c``: the per-channel factor, shaped to broadcast."""
    W = layer.weight
    if not applies(layer, W) or c.dtype != torch.float32 or not c.is_contiguous():
        return None
    with torch.no_grad():
        w = W * c
        found = _scales(layer, w)
    if found is None:
        return None
    bound, scale = found
    return _WeightQuant.apply(W, c, w, bound, scale, *_args(layer))
