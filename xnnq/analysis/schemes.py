"""The same weights under three number formats of equal bitwidth: INT, POT and FLOAT.

* ``INT``: uniform symmetric codes ``[-2^(b-1), 2^(b-1)-1]`` with a power-of-2 scale (TIDL's weights;
  :func:`xnnq.layers.weight_scale`, divided by ``2^shift`` for a layer clipped by calibration).
* ``POT``: power-of-two levels ``{0, ±M·2^-k, k = 0..2^(b-1)-2}`` (a sign bit and an exponent code;
  ``M`` = the largest weight rounded up to a power of two); each weight goes to the nearest level.
* ``FLOAT``: a mini-float, ``E4M3`` for 8 bits and ``E5M10`` for 16 (sign, exponent, mantissa; IEEE-style
  bias ``2^(e-1)-1``, subnormals, every exponent code finite, round half to even), times a power-of-2
  tensor scale chosen so that the largest weight is representable.

Each function returns the de-quantized tensor (float, the input's shape); ``axis`` gives per-channel
scales along that dimension (``None``: one scale per tensor).
"""

from __future__ import annotations

import torch

from ..layers.fake_quant import (
    MIN_RANGE,
    fake_quantize,
    max_abs,
    pow2_ceil,
    quant_bounds,
    weight_scale_from_max,
)

SCHEMES = ("INT", "POT", "FLOAT")
MINIFLOAT_BITS = {8: (4, 3), 16: (5, 10)}  # bits -> (exponent bits, mantissa bits)


def _absmax(w: torch.Tensor, axis: int | None) -> torch.Tensor:
    """max|w| per tensor (0-d) or per channel, shaped to broadcast against ``w``."""
    if axis is None:
        return w.abs().amax()
    dims = [d for d in range(w.dim()) if d != axis]
    return w.abs().amax(dim=dims, keepdim=True) if dims else w.abs()


def quantize_int(
    w: torch.Tensor,
    bits: int,
    axis: int | None = None,
    power2: bool = True,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """Uniform symmetric ``bits``-bit quantization (TIDL's weight grid); ``shift``: a layer's
    ``weight_range_shift`` (the scale divided by ``2^shift``, as the layer deploys it)."""
    qmin, qmax = quant_bounds(bits, True)
    return fake_quantize(w, weight_scale_from_max(max_abs(w, axis), bits, power2, shift), qmin, qmax, axis)


def quantize_pot(w: torch.Tensor, bits: int, axis: int | None = None) -> torch.Tensor:
    """Nearest power-of-two level: ``0`` or ``±M·2^-k``, ``k < 2^(b-1)-1``, ``M = pow2_ceil(max|w|)``."""
    top = pow2_ceil(_absmax(w, axis))
    n_exp = (1 << (bits - 1)) - 1
    a = (w.abs() / top).clamp(max=1.0)
    e = torch.floor(torch.log2(a.clamp(min=MIN_RANGE**2))).clamp(min=-(n_exp - 1))
    low = torch.exp2(e)
    mag = torch.where(a >= 1.5 * low, 2.0 * low, low).clamp(max=1.0)
    mag = torch.where(a < 0.5 * torch.exp2(torch.tensor(-(n_exp - 1.0))), torch.zeros_like(mag), mag)
    return torch.sign(w) * mag * top


def minifloat_max(exp_bits: int, man_bits: int) -> float:
    """Largest finite value of the mini-float (all exponent codes finite)."""
    bias = (1 << (exp_bits - 1)) - 1
    return (2.0 - 2.0**-man_bits) * 2.0 ** ((1 << exp_bits) - 1 - bias)


def round_minifloat(x: torch.Tensor, exp_bits: int, man_bits: int) -> torch.Tensor:
    """Round ``x`` to the nearest ``E{exp_bits}M{man_bits}`` value (saturating at the largest one)."""
    bias = (1 << (exp_bits - 1)) - 1
    top = minifloat_max(exp_bits, man_bits)
    a = x.abs().clamp(max=top)
    e = torch.floor(torch.log2(a.clamp(min=2.0 ** (1 - bias)))).clamp(min=1 - bias)  # subnormals share 1-bias
    step = torch.exp2(e - man_bits)
    return torch.sign(x) * (torch.round(a / step) * step).clamp(max=top)


def quantize_float(w: torch.Tensor, bits: int, axis: int | None = None) -> torch.Tensor:
    """Mini-float of ``bits`` bits (E4M3 / E5M10) with a power-of-2 scale fitting the largest weight."""
    exp_bits, man_bits = MINIFLOAT_BITS[bits]
    scale = pow2_ceil(_absmax(w, axis) / minifloat_max(exp_bits, man_bits))
    return round_minifloat(w / scale, exp_bits, man_bits) * scale


def quantize_scheme(
    w: torch.Tensor,
    scheme: str,
    bits: int,
    axis: int | None = None,
    power2: bool = True,
    shift: torch.Tensor | None = None,
) -> torch.Tensor:
    """``w`` under ``scheme`` ("INT", "POT" or "FLOAT"); ``shift`` applies to INT (see :func:`quantize_int`)."""
    if scheme == "INT":
        return quantize_int(w, bits, axis, power2, shift)
    if scheme == "POT":
        return quantize_pot(w, bits, axis)
    if scheme == "FLOAT":
        return quantize_float(w, bits, axis)
    raise ValueError(f"unknown scheme {scheme!r}: choose one of {SCHEMES}")
