"""Rounding modes: the one home of "how a value is rounded to an integer code".

Read by the PyTorch simulation (:class:`~xnnq.layers.PACT2`, through :func:`round_tensor`) and by the
bit-true integer reference (:mod:`xnnq.export.reference`, through :func:`round_div` and
:func:`round_array`), so that both apply the same rule at the same place.

Modes (``x`` the exact value in units of the output step):

* ``half_even``: nearest, ties to even (ONNX ``QuantizeLinear``, ``torch.round``, onnxruntime).
* ``half_up``: nearest, ties towards +inf, ``floor(x + 1/2)``: TIDL's requantization ``TIDL_roundSat``
  (add ``2^(shift-1)``, arithmetic shift right, saturate).
* ``half_away``: nearest, ties away from zero: TIDL's float-to-fixed input conversion (``±0.5`` then a
  truncating cast).
* ``floor``: towards -inf: TIDL's integer bilinear ``Resize`` (weighted sum shifted right, no rounding term).
* ``tidl``: what TIDL does at each site (:class:`Site`): ``half_up`` for every requantization,
  ``half_away`` where a float network input is quantized, ``floor`` in a linear ``Resize``.

Sources: docs/README_tidl.md, "Rounding, saturation and arithmetic".
"""

from __future__ import annotations

from enum import Enum

import numpy as np
import torch


class Rounding(str, Enum):
    """A rounding mode (the string values are accepted wherever a mode is)."""

    HALF_EVEN = "half_even"
    HALF_UP = "half_up"
    HALF_AWAY = "half_away"
    FLOOR = "floor"
    TIDL = "tidl"


class Site(str, Enum):
    """Where a value is rounded: the network input (float → code), a requantization (accumulator →
    code), or the interpolation of a linear ``Resize``."""

    INPUT = "input"
    REQUANT = "requant"
    RESIZE = "resize"


_TIDL_SITES = {Site.INPUT: Rounding.HALF_AWAY, Site.REQUANT: Rounding.HALF_UP, Site.RESIZE: Rounding.FLOOR}

DEFAULT = (
    Rounding.HALF_EVEN
)  # onnxruntime's QDQ semantics; TIDL's own rule is the option ``tidl`` (TI's docs are silent)


def as_rounding(mode: Rounding | str) -> Rounding:
    """``mode`` as a :class:`Rounding`; a clear error for an unknown name."""
    try:
        return Rounding(mode)
    except ValueError:
        raise ValueError(f"rounding must be one of {[r.value for r in Rounding]}, got {mode!r}") from None


def resolve(mode: Rounding | str, site: Site | str = Site.REQUANT) -> Rounding:
    """The concrete mode (never ``tidl``) applied at ``site`` under ``mode``."""
    mode = as_rounding(mode)
    return _TIDL_SITES[Site(site)] if mode is Rounding.TIDL else mode


# ------------------------------------------------------------------------------------------ torch
def round_tensor(x: torch.Tensor, mode: Rounding | str, site: Site | str = Site.REQUANT) -> torch.Tensor:
    """``x`` rounded to integers (a new tensor) under ``mode`` at ``site``."""
    mode = resolve(mode, site)
    if mode is Rounding.HALF_EVEN:
        return torch.round(x)
    if mode is Rounding.HALF_UP:
        return torch.floor(x + 0.5)
    if mode is Rounding.HALF_AWAY:
        return torch.copysign(torch.floor(x.abs() + 0.5), x)
    return torch.floor(x)


def round_tensor_(x: torch.Tensor, mode: Rounding | str, site: Site | str = Site.REQUANT) -> torch.Tensor:
    """In-place :func:`round_tensor` (``x`` must not be needed by autograd)."""
    mode = resolve(mode, site)
    if mode is Rounding.HALF_EVEN:
        return x.round_()
    if mode is Rounding.HALF_UP:
        return x.add_(0.5).floor_()
    if mode is Rounding.HALF_AWAY:
        sign = torch.sign(x)
        return x.abs_().add_(0.5).floor_().mul_(sign)
    return x.floor_()


# ------------------------------------------------------------------------------------------ numpy
def round_array(x: np.ndarray, mode: Rounding | str, site: Site | str = Site.INPUT) -> np.ndarray:
    """Float ``x`` rounded to integers (float array of integral values) under ``mode`` at ``site``."""
    mode = resolve(mode, site)
    if mode is Rounding.HALF_EVEN:
        return np.rint(x)
    if mode is Rounding.HALF_UP:
        return np.floor(x + 0.5)
    if mode is Rounding.HALF_AWAY:
        return np.copysign(np.floor(np.abs(x) + 0.5), x)
    return np.floor(x)


def round_div(
    num: np.ndarray, den: np.ndarray | int, mode: Rounding | str, site: Site | str = Site.REQUANT
) -> np.ndarray:
    """``num / den`` rounded to an integer under ``mode`` at ``site``, in exact int64 arithmetic.

    ``den`` > 0 (an int or an int64 array broadcastable against ``num``). A shift right by ``k`` bits
    is ``round_div(num, 1 << k, ...)``; with ``half_up`` it is TIDL's ``(num + 2^(k-1)) >> k``.
    """
    mode = resolve(mode, site)
    num = np.asarray(num, dtype=np.int64)
    den = np.asarray(den, dtype=np.int64)
    if np.any(den <= 0):
        raise ValueError("round_div: the divisor must be positive")
    if not np.any(den & (den - 1)):  # powers of 2: shifts (TIDL's form, and much faster than division)
        return round_shift(num, np.log2(den).astype(np.int64), mode)
    if mode is Rounding.FLOOR:
        return np.floor_divide(num, den)
    if mode is Rounding.HALF_UP:
        return np.floor_divide(2 * num + den, 2 * den)
    if mode is Rounding.HALF_AWAY:
        return np.sign(num) * np.floor_divide(2 * np.abs(num) + den, 2 * den)
    q, r = np.divmod(num, den)  # r in [0, den)
    twice = 2 * r
    return q + ((twice > den) | ((twice == den) & (q % 2 == 1)))


def round_shift(
    num: np.ndarray, bits: np.ndarray | int, mode: Rounding | str, site: Site | str = Site.REQUANT
) -> np.ndarray:
    """``num / 2^bits`` (``bits`` >= 0, scalar or broadcastable) rounded under ``mode`` at ``site``, with
    arithmetic shifts; ``half_up`` is TIDL's ``(num + 2^(bits-1)) >> bits``."""
    mode = resolve(mode, site)
    num = np.asarray(num, dtype=np.int64)
    bits = np.asarray(bits, dtype=np.int64)
    if not bits.any():
        return num
    half = np.where(bits > 0, np.left_shift(np.int64(1), np.maximum(bits - 1, 0)), 0)
    if mode is Rounding.FLOOR:
        return num >> bits
    if mode is Rounding.HALF_UP:
        return (num + half) >> bits
    if mode is Rounding.HALF_AWAY:
        return np.sign(num) * ((np.abs(num) + half) >> bits)
    q = num >> bits
    r = num - (q << bits)  # in [0, 2^bits)
    return q + ((r > half) | ((r == half) & (bits > 0) & ((q & 1) == 1)))
