"""Error measures between a float tensor and its quantized version (plain tensor maths, no model)."""

from __future__ import annotations

import math

import torch


def sqnr_db(signal_power: float, noise_power: float) -> float:
    """``10·log10(Σ f² / Σ (q−f)²)`` in dB; ``inf`` for an exact match, ``nan`` for an all-zero signal."""
    if noise_power <= 0.0:
        return math.inf if signal_power > 0.0 else math.nan
    if signal_power <= 0.0:
        return -math.inf
    return 10.0 * math.log10(signal_power / noise_power)


def sqnr(ref: torch.Tensor, q: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``q`` against ``ref`` in dB."""
    ref, q = ref.detach().double(), q.detach().double()
    return sqnr_db(float(ref.square().sum()), float((q - ref).square().sum()))


def cosine(dot: float, norm2_a: float, norm2_b: float) -> float:
    """Cosine similarity from ``Σ a·b``, ``Σ a²`` and ``Σ b²`` (1.0 when both are zero)."""
    if norm2_a <= 0.0 and norm2_b <= 0.0:
        return 1.0
    if norm2_a <= 0.0 or norm2_b <= 0.0:
        return 0.0
    return dot / math.sqrt(norm2_a * norm2_b)


def histogram_pair(a: torch.Tensor, b: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized histograms of ``a`` and ``b`` on the same ``bins`` equal-width bins over both ranges."""
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    lo = float(torch.minimum(a.min(), b.min()))
    hi = float(torch.maximum(a.max(), b.max()))
    if hi <= lo:
        hi = lo + 1.0
    ha = torch.histc(a, bins, lo, hi)
    hb = torch.histc(b, bins, lo, hi)
    return ha / ha.sum(), hb / hb.sum()


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> float:
    """Jensen-Shannon divergence (base 2, in [0, 1]) between two discrete distributions."""
    p, q = p.double(), q.double()
    m = 0.5 * (p + q)

    def kl(x: torch.Tensor) -> torch.Tensor:
        nz = x > 0
        return (x[nz] * torch.log2(x[nz] / m[nz])).sum()

    return float(0.5 * kl(p) + 0.5 * kl(q))


def weight_js(w: torch.Tensor, wq: torch.Tensor, bins: int = 512) -> float:
    """JS divergence between the histogram of ``w`` and of ``wq`` (same ``bins`` bins over both ranges)."""
    return js_divergence(*histogram_pair(w, wq, bins))
