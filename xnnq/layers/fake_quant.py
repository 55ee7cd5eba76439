"""Fake-quantization primitives: the one function that computes ``q(x)`` for every consumer.

Numerics (TIDL's): symmetric, zero-point 0.

* signed:   ``q = clamp(round(x / s), -2^(b-1), 2^(b-1) - 1) * s``
* unsigned: ``q = clamp(round(x / s), 0, 2^b - 1) * s``
* ``round`` is round-half-to-even (``torch.round``, the same as ``torch.fake_quantize_*`` and ONNX
  ``QuantizeLinear``) unless another mode of :mod:`xnnq.layers.rounding` is asked for (PACT2 asks for
  TIDL's by default: see :class:`~xnnq.layers.PACT2`).
* Power-of-2 range: a range ``r`` is rounded *up* to ``R = 2^ceil(log2 r)``; the scale is
  ``R / 2^(b-1)`` signed or ``R / 2^b`` unsigned, so the largest code is ``R - s``.
* Gradient: straight-through estimator, masked to the codes that did not saturate (the gradient of
  ``clamp``), for ``x`` only; scales are not learned.

Kernels (all give the same values, bit for bit; tested):

* CUDA: the fused ``torch.fake_quantize_per_{tensor,channel}_affine`` kernels.
* CPU, 8-bit per-tensor: ``torch.quantize_per_tensor(...).dequantize()`` (:class:`_FakeQuantQDQ`), one
  vectorized pass each way, where the element-wise path needs four and the fused fake-quant kernel's CPU
  version is not vectorized. Those
  functions are deprecated in torch 2.14 (their one-time warning is filtered here); where they are missing
  the element-wise path is used. A tensor holding NaN takes the element-wise path too, so NaN propagates
  instead of becoming a code.
* Otherwise (16-bit, per-channel): :class:`_FakeQuantSTE`, four element-wise passes.
"""

from __future__ import annotations

import math
import warnings

import torch

from .rounding import Rounding, resolve, round_tensor_

_QDQ_DTYPES = {(0, 255): getattr(torch, "quint8", None), (-128, 127): getattr(torch, "qint8", None)}
_HAS_QDQ = hasattr(torch, "quantize_per_tensor") and all(_QDQ_DTYPES.values())
if _HAS_QDQ:  # spend torch's once-per-process deprecation warning here, silenced
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.quantize_per_tensor(torch.zeros(1), 1.0, 0, torch.quint8)

MIN_RANGE = 2.0**-24  # a range below this (an all-zero tensor) is treated as this


def quant_bounds(bits: int, signed: bool) -> tuple[int, int]:
    """Integer code range for ``bits`` (8 or 16): signed ``[-2^(b-1), 2^(b-1)-1]``, unsigned ``[0, 2^b-1]``."""
    check_bits(bits)
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def grid_levels(bits: int, signed: bool, power2: bool = True) -> int:
    """Steps of the grid from 0 to its range ``R`` (``R = levels · scale``): with a power-of-2 range
    ``2^(b-1)`` signed, ``2^b`` unsigned (the largest code is ``R - s``); without, ``2^(b-1) - 1`` or
    ``2^b - 1`` (the largest code is ``R``)."""
    n = 1 << (bits - 1) if signed else 1 << bits
    return n if power2 else n - 1


def check_bits(bits: int, where: str = "") -> None:
    if bits not in (8, 16):
        raise ValueError(
            f"{where + ': ' if where else ''}bitwidth {bits} is not supported; TIDL quantizes to 8 or 16 bits"
        )


def ceil_log2(r: torch.Tensor) -> torch.Tensor:
    """``ceil(log2 r)`` exactly, for positive normal float32 ``r`` (same dtype): from the binary exponent
    (``torch.frexp``), not from ``torch.log2``, whose float32 result rounds to the integer ``k`` for values a
    few ulps above ``2^k`` (``2^-5·(1 + 2^-23)`` gave ``ceil = -5``; it is ``-4``). NaN or ±inf give NaN.

    ``r·(1 - 2^-24)`` lies in ``[2^(k-1), 2^k)`` for ``r`` in ``(2^(k-1), 2^k]`` (``2^k`` itself steps below it;
    a value just above ``2^(k-1)`` rounds to it at most), where ``frexp``'s exponent is ``k``."""
    _, ex = torch.frexp(r * (1.0 - 2.0**-24))
    return ex.to(r.dtype) + (r - r)  # r - r: 0, or NaN where r is not finite


def pow2_ceil(r: torch.Tensor) -> torch.Tensor:
    """Smallest power of two ``>= r`` (element-wise; ``r`` below ``MIN_RANGE`` gives ``MIN_RANGE``)."""
    return torch.exp2(ceil_log2(r.clamp(min=MIN_RANGE)))


def activation_scale(range_: torch.Tensor, bits: int, signed: bool, power2: bool = True) -> torch.Tensor:
    """Scale for a symmetric activation range ``[−R, R]`` (signed) or ``[0, R]`` (unsigned).

    With ``power2`` the range is first rounded up to a power of two; without it the largest code maps
    to ``range_`` exactly.
    """
    r = range_.clamp(min=MIN_RANGE)
    if power2:
        r = pow2_ceil(r)
    return r / float(grid_levels(bits, signed, power2))


def max_abs(w: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """``max |w|`` (detached): a 0-d tensor, or one value per index of ``axis``."""
    a = w.detach().abs()
    if axis is None:
        return a.amax()
    dims = [d for d in range(w.dim()) if d != axis]
    return a.amax(dim=dims) if dims else a


def weight_scale(w: torch.Tensor, bits: int, axis: int | None = None, power2: bool = True) -> torch.Tensor:
    """Symmetric weight scale (per tensor, or per channel along ``axis``): :func:`weight_scale_from_max`
    of ``max |w|``."""
    return weight_scale_from_max(max_abs(w, axis), bits, power2)


def weight_scale_from_max(
    m: torch.Tensor, bits: int, power2: bool = True, shift: torch.Tensor | None = None
) -> torch.Tensor:
    """Weight scale from the largest magnitude ``m``, divided by ``2^shift`` when given.

    Power-of-2 rule, chosen so that re-quantizing the quantized weights with the same rule changes
    nothing (what TIDL does with exported weights): ``k = ceil(log2 m)``, scale ``2^k / 2^(b-1)``; if the
    largest weight rounds to exactly ``2^(k-1)`` on that grid (code ``2^(b-2)``, i.e. ``m / s <= 2^(b-2) + 0.5``
    with round-half-to-even), the grid of ``k-1`` is used instead. Every weight whose code does not
    saturate is within half a step; a positive weight at or just below a power of two saturates to the
    largest code by less than two steps of the returned scale (one step of the coarser grid; tested in
    tests/test_properties.py).
    """
    m = m.clamp(min=MIN_RANGE)
    if not power2:
        s = m / float(grid_levels(bits, True, False))
        return s if shift is None else s * torch.exp2(-shift.to(s.dtype))
    e = ceil_log2(m) - (bits - 1)  # log2 of the scale of the range 2^ceil(log2 m)
    finer = m <= (float(1 << (bits - 2)) + 0.5) * torch.exp2(e)
    e = torch.where(finer, e - 1, e)
    return torch.exp2(e if shift is None else e - shift)


def _mask_bounds(qmin: int, qmax: int) -> tuple[float, float]:
    """Open interval of codes ``x / s`` whose rounded code is in ``[qmin, qmax]``, for the even ``qmin`` and
    odd ``qmax`` of every bitwidth: round-half-to-even keeps ``qmin - 0.5`` (-> qmin) and sends ``qmax + 0.5``
    to ``qmax + 1``, so the lower bound is the float32 just below ``qmin - 0.5``. Plain Python arithmetic (no
    tensor, no ``.item()``), so ``torch.compile`` folds it to constants instead of breaking the graph."""
    v = qmin - 0.5  # < 0 and exact in float32; the next float32 away from 0 is one float32 ulp further
    _, e = math.frexp(v)  # |v| = m·2^e, 0.5 <= m < 1: the float32 ulp of |v| is 2^(e - 24)
    return v - math.ldexp(1.0, e - 24), qmax + 0.5


class _FakeQuantSTE(torch.autograd.Function):
    """Forward: one allocating multiply to codes (kept for backward) and three passes on the output.
    Backward: one fused pass, ``aten.hardtanh_backward`` on the
    codes (the gradient where ``qmin - 0.5 < x / s < qmax + 0.5``, i.e. where the rounded code did not
    saturate)."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        scale: torch.Tensor,
        qmin: int,
        qmax: int,
        rounding: Rounding = Rounding.HALF_EVEN,
    ) -> torch.Tensor:
        codes = torch.mul(x, 1.0 / scale)
        out = torch.clamp(codes, qmin, qmax)
        # code 0 dequantizes to +0.0 (as an integer does, and as the 8-bit and fused paths give), not -0.0
        round_tensor_(out, rounding).add_(0.0).mul_(scale)
        ctx.save_for_backward(codes)
        ctx.bounds = _mask_bounds(qmin, qmax)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (codes,) = ctx.saved_tensors
        return torch.ops.aten.hardtanh_backward(grad, codes, *ctx.bounds), None, None, None, None


class _FakeQuantQDQ(torch.autograd.Function):
    """CPU 8-bit per-tensor forward through torch's vectorized quantize / dequantize kernels; backward as
    :class:`_FakeQuantSTE`, on ``x`` with the bounds scaled (a CPU scale is read without a device sync)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float, qmin: int, qmax: int) -> torch.Tensor:
        out = torch.quantize_per_tensor(x, scale, 0, _QDQ_DTYPES[(qmin, qmax)]).dequantize()
        ctx.save_for_backward(x)
        lo, hi = _mask_bounds(qmin, qmax)
        ctx.bounds = (lo * scale, hi * scale)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return torch.ops.aten.hardtanh_backward(grad, x, *ctx.bounds), None, None, None


def _along(scale: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """``scale`` shaped to broadcast against ``x`` along ``axis`` (unchanged when per tensor)."""
    if axis is None:
        return scale
    shape = [1] * x.dim()
    shape[axis] = -1
    return scale.reshape(shape)


class _ClipFakeQuantSTE(torch.autograd.Function):
    """``q(clamp(x, -bound, bound))`` for small tensors (weights) in one function: the gradient passes where
    ``|x| <= bound`` and the code did not saturate (the product of the two masks autograd would build, with
    one saved boolean tensor instead of clamp's five-op backward)."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, bound: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int
    ) -> torch.Tensor:
        codes = torch.clamp(x, -bound, bound).mul_(1.0 / scale)
        lo, hi = _mask_bounds(qmin, qmax)
        ctx.save_for_backward((x.abs() <= bound) & (codes > lo) & (codes < hi))
        return codes.clamp_(qmin, qmax).round_().mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return torch.where(mask, grad, 0.0), None, None, None, None


def clip_fake_quantize(
    x: torch.Tensor, bound: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, axis: int | None = None
) -> torch.Tensor:
    """:func:`fake_quantize` of ``clamp(x, -bound, bound)`` (``bound`` a 0-d tensor), with the gradient of
    the clamp and the straight-through estimator together. For weight tensors (the element-wise path)."""
    return _ClipFakeQuantSTE.apply(x, bound, _along(scale, x, axis), int(qmin), int(qmax))


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    qmin: int,
    qmax: int,
    axis: int | None = None,
    rounding: Rounding | str = Rounding.HALF_EVEN,
) -> torch.Tensor:
    """Quantize-dequantize ``x`` with zero-point 0 and a straight-through gradient.

    ``scale`` is a 0-d tensor (per tensor) or a 1-d tensor along ``axis`` (per channel). ``qmin``/``qmax``
    are the integer code bounds. ``rounding``: a concrete mode of :mod:`xnnq.layers.rounding`
    (``half_even``: the fused/vectorized torch kernels; any other mode: the element-wise path).
    """
    rounding = resolve(rounding)
    if rounding is not Rounding.HALF_EVEN:
        return _FakeQuantSTE.apply(x, _along(scale, x, axis), int(qmin), int(qmax), rounding)
    if x.is_cuda and x.dtype == torch.float32:
        if axis is None:
            zp = torch.zeros((), dtype=torch.int32, device=x.device)
            return torch.fake_quantize_per_tensor_affine(x, scale.reshape(()).float(), zp, qmin, qmax)
        zp = torch.zeros(scale.numel(), dtype=torch.int32, device=x.device)
        return torch.fake_quantize_per_channel_affine(x, scale.float(), zp, axis, qmin, qmax)
    if (
        axis is None
        and _HAS_QDQ
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and (qmin, qmax) in _QDQ_DTYPES
        and not torch.isnan(x.sum())
    ):
        return _FakeQuantQDQ.apply(x, float(scale), int(qmin), int(qmax))
    return _FakeQuantSTE.apply(x, _along(scale, x, axis), int(qmin), int(qmax))


INT32_MAX = 2**31 - 1


def accumulator_headroom(
    w_codes: torch.Tensor, w_bits: int, x_bits: int, x_max_code: int, axis: int = 0
) -> torch.Tensor | float:
    """What the products of one output channel can add to its accumulator: ``max|x code| · Σ|w code|``
    per channel along ``axis`` (a bound over every input on the grid) when both operands are 8-bit — TIDL
    and onnxruntime's fused ``QLinearConv``/``QGemm`` add bias and products in int32 (the latter wraps on
    overflow); 0 otherwise (16-bit operands accumulate in 64 bits)."""
    if w_bits != 8 or x_bits != 8:
        return 0.0
    dims = tuple(d for d in range(w_codes.dim()) if d != axis)
    return float(x_max_code) * w_codes.detach().abs().to(torch.float64).sum(dim=dims)


def bias_limit(headroom: torch.Tensor | float = 0.0) -> torch.Tensor:
    """The largest |bias code| kept: ``INT32_MAX - headroom`` (so that bias + products stay in int32),
    rounded down to a float32 value (the simulated bias is a float32; its code is the exported int32)."""
    lim = (INT32_MAX - torch.as_tensor(headroom, dtype=torch.float64)).clamp_min(0.0)
    lim32 = lim.float()
    return torch.where(lim32.double() > lim, torch.nextafter(lim32, torch.zeros_like(lim32)), lim32)


def quantize_bias(b: torch.Tensor, scale: torch.Tensor, headroom: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Bias on the accumulator grid ``scale = s_in * s_w`` (int32 codes), straight-through gradient.

    The codes saturate at :func:`bias_limit` ``(headroom)``: with the :func:`accumulator_headroom` of the
    layer, no input can take bias + products out of int32."""
    lim = bias_limit(headroom).to(b.device)
    q = torch.round(b / scale).clamp(-lim, lim) * scale
    return q.detach() + (b - b.detach())  # exactly q (``b + (q - b)`` is not when q - b is large)
