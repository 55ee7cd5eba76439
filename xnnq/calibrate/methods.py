"""Range selection from a :class:`~xnnq.calibrate.histogram.Histogram`: max, percentile, MSE, entropy (KL).

Every method returns the range ``R`` that the quantizer then uses as is: the scale is ``R / 2^(b-1)``
(signed) or ``R / 2^b`` (unsigned) with power-of-2 ranges (TIDL), ``R / (2^(b-1) - 1)`` or ``R / (2^b - 1)``
without (the largest code maps to ``R``) — the numerics of :func:`xnnq.layers.activation_scale`.

With power-of-2 ranges each method chooses among the candidates ``2^j`` (from the smallest power of two
holding every value down to the bin width) by its own objective, not by rounding its float answer up:

* ``max``: the smallest ``2^j`` holding every value (here rounding up *is* the objective).
* ``percentile``: the smallest ``2^j`` that holds at least ``p`` % of the values (of ``|x|``; of ``x`` for
  an unsigned quantizer).
* ``mse``: the least total squared error ``sum (q(x) - x)^2`` over the calibration values, for the exact
  code bounds of the quantizer (signed codes are asymmetric: ``[-2^(b-1), 2^(b-1) - 1]``). A bin maps to
  one code when the grid step is at least twice the bin width (always the case for power-of-2 grids above
  that); its error is ``n((c - q)^2 + w^2/12)`` (values spread uniformly in the bin). Finer grids count
  ``n s^2 / 12`` for every unsaturated bin.
* ``entropy``: TensorRT's KL-divergence calibration (Migacz 2017, as in NVIDIA pytorch-quantization): the
  histogram of ``|x|`` (of ``x`` for unsigned) cut at ``i`` bins with the clipped mass added to the last
  bin is the reference ``P``; the unclipped ``i`` bins merged into ``L`` levels (``2^(b-1)`` signed,
  ``2^b`` unsigned) and spread back over their non-empty bins are ``Q``; the threshold minimizing
  ``KL(P || Q)`` wins. Candidates need ``i >= L`` bins (TensorRT's start); a tensor too coarse for that
  (16-bit: 32768 levels) falls back to ``max``.

Without power-of-2 ranges: ``max`` is the absolute maximum, ``percentile`` interpolates inside the bin, and
``mse``/``entropy`` search up to ``search_points`` thresholds on bin edges.
"""

from __future__ import annotations

import math

import torch

from ..layers.fake_quant import grid_levels, quant_bounds
from .histogram import Histogram

METHODS = ("max", "percentile", "mse", "entropy")


def grid_step(r: float, bits: int, signed: bool, power2: bool) -> float:
    """Quantization step for a candidate range ``r`` (a power of two when ``power2``): the scale
    :func:`~xnnq.layers.activation_scale` gives it, in float64."""
    return r / grid_levels(bits, signed, power2)


def pow2_candidates(hist: Histogram, absmax: float) -> list[float]:
    """Powers of two from the smallest ``>= absmax`` down to the bin width (largest first)."""
    top = math.ceil(math.log2(max(absmax, hist.width)))
    bottom = round(math.log2(hist.width))
    return [math.ldexp(1.0, j) for j in range(top, bottom - 1, -1)]


def edge_candidates(hist: Histogram, absmax: float, first: int, points: int) -> list[float]:
    """Thresholds on bin edges from ``first`` bins up to ``absmax``, at most ``points`` of them (largest last)."""
    last = max(first, math.ceil(absmax / hist.width))
    step = max(1, (last - first) // max(1, points - 1))
    idx = list(range(first, last + 1, step))
    if idx[-1] != last:
        idx.append(last)
    return [i * hist.width for i in idx]


# ---------------------------------------------------------------------------------------- objectives
def mse_errors(hist: Histogram, ranges: list[float], bits: int, signed: bool, power2: bool) -> torch.Tensor:
    """Estimated total squared quantization error for each candidate range (float64 tensor)."""
    c, n, w = hist.centers(), hist.counts, hist.width
    qmin, qmax = quant_bounds(bits, signed)
    out = []
    for r in ranges:
        s = grid_step(r, bits, signed, power2)
        code = torch.round(c / s)
        q = code.clamp(qmin, qmax) * s
        err = n * ((c - q) ** 2 + w * w / 12.0)
        if not (power2 and s >= 2 * w):  # the grid is finer than the bins, or not aligned with them
            inside = (code >= qmin) & (code <= qmax)
            err = torch.where(inside, n * (s * s / 12.0), err)
        out.append(err.sum())
    return torch.stack(out)


def kl_divergence(h: torch.Tensor, i: int, nlevels: int) -> float:
    """TensorRT's ``KL(P || Q)`` for the threshold at ``i`` bins of the non-negative histogram ``h``."""
    sliced = h[:i]
    if float(sliced.sum()) <= 0:
        return math.inf
    p = sliced.clone()
    p[-1] += h[i:].sum()
    groups = torch.arange(i, device=h.device) * nlevels // i
    nonzero = (sliced > 0).double()
    gsum = torch.zeros(nlevels, dtype=h.dtype, device=h.device).index_add_(0, groups, sliced)
    gcnt = torch.zeros(nlevels, dtype=h.dtype, device=h.device).index_add_(0, groups, nonzero)
    q = nonzero * gsum[groups] / gcnt[groups].clamp(min=1)
    p, q = p / p.sum(), q / q.sum()
    keep = p > 0
    if bool((q[keep] == 0).any()):
        return math.inf
    return float((p[keep] * torch.log(p[keep] / q[keep])).sum())


def percentile_of(h: torch.Tensor, width: float, p: float) -> float:
    """``p``-th percentile of the non-negative histogram ``h`` (linear inside the bin)."""
    cum = torch.cumsum(h, 0)
    target = p / 100.0 * float(cum[-1])
    j = int(
        torch.searchsorted(cum, torch.tensor([target], dtype=cum.dtype, device=cum.device)).clamp(
            max=len(h) - 1
        )
    )
    before = float(cum[j - 1]) if j > 0 else 0.0
    inside = float(h[j])
    frac = (target - before) / inside if inside > 0 else 1.0
    return (j + min(max(frac, 0.0), 1.0)) * width


# ------------------------------------------------------------------------------------------ choice
def choose_range(
    hist: Histogram,
    method: str,
    bits: int,
    signed: bool,
    power2: bool = True,
    percentile: float = 99.99,
    search_points: int = 512,
) -> float:
    """The range ``R`` that ``method`` picks for a quantizer of ``bits`` and signedness ``signed``."""
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    if hist.empty:
        raise RuntimeError(f"{hist.name or 'Histogram'}: no calibration data was observed")
    if float(hist.counts.sum()) == 0:  # nothing to represent but exact zeros (a dead ReLU)
        return hist.width
    lo, hi = float(hist.min_val), float(hist.max_val)
    absmax = max(-lo, hi) if signed else max(hi, 0.0)
    absmax = max(absmax, hist.width)
    if method == "max":
        return pow2_candidates(hist, absmax)[0] if power2 else absmax
    h = hist.abs_counts(signed)
    if method == "percentile":
        if not power2:
            return max(percentile_of(h, hist.width, percentile), hist.width)
        cum = torch.cumsum(h, 0)
        need = percentile / 100.0 * float(cum[-1])
        cands = pow2_candidates(hist, absmax)
        best = cands[0]  # holds every value (>= absmax), whatever the bins say: the fallback
        for r in cands[1:]:  # largest first: keep the last that still covers p %
            # only whole bins below r count: the bin that holds r may hold values above it
            if float(cum[max(min(math.floor(r / hist.width + 1e-9), len(h)) - 1, 0)]) >= need * (1 - 1e-12):
                best = r
            else:
                break  # coverage only shrinks with r
        return best
    if method == "mse":
        cands = pow2_candidates(hist, absmax) if power2 else edge_candidates(hist, absmax, 1, search_points)
        return cands[int(torch.argmin(mse_errors(hist, cands, bits, signed, power2)))]
    # entropy
    nlev = grid_levels(bits, signed)
    if power2:
        cands = [r for r in pow2_candidates(hist, absmax) if round(r / hist.width) >= nlev]
    else:
        cands = edge_candidates(hist, absmax, nlev, search_points) if absmax / hist.width >= nlev else []
    if not cands:
        return pow2_candidates(hist, absmax)[0] if power2 else absmax
    kl = [kl_divergence(h, round(r / hist.width), nlev) for r in cands]
    return cands[min(range(len(kl)), key=kl.__getitem__)]
