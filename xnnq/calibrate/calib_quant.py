"""CalibPACT2: a PACT2 whose range is chosen from a histogram of calibration data."""
from __future__ import annotations

from typing import Any

import torch

from ..layers.pact2 import PACT2
from .histogram import Histogram, all_reduce_histogram
from .methods import METHODS, choose_range


class CalibPACT2(PACT2):
    """PACT2 that, in training mode, passes its input through in float and counts it in a :class:`Histogram`.

    :meth:`finalize` picks the range with ``method`` and writes it into the inherited tracker's
    ``min_val``/``max_val`` buffers, so ``qparams``, ``clip_values``, export and the state dict are those
    of a plain :class:`PACT2` (a calibrated state dict loads into ``QuantTestModule``). The histogram is not
    part of the state dict.

    The histogram counts the input (clamped to ``cap`` for a ``ReLU6``). For a quantizer that replaces a
    ReLU (``signed=False``) the negative inputs are represented exactly (as the ReLU's 0) under every
    range, so the methods leave them out: the percentile, the squared error and the KL divergence are
    those of the positive outputs (without the spike at 0, which otherwise drives entropy calibration to
    clip hard). A quantizer built with ``signed=None`` is made signed when more than ``tail`` of the
    values are negative; if not, its negative values count as clipped to 0.

    Args: those of :class:`PACT2`, and ``method`` (``"max"``, ``"percentile"``, ``"mse"``, ``"entropy"``),
    ``percentile``, ``bins``, ``max_bins``, ``sample_size`` (see :class:`Histogram`).
    """

    def __init__(self, *, method: str = "mse", percentile: float = 99.99, bins: int = 2048, max_bins: int = 1 << 16,
                 sample_size: int = 1 << 16, **pact2_kwargs: Any):
        super().__init__(**pact2_kwargs)
        if method not in METHODS:
            raise ValueError(f"{self.name or 'CalibPACT2'}: unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"{self.name or 'CalibPACT2'}: percentile must be in (0, 100], got {percentile}")
        self.method, self.percentile = method, percentile
        self.histogram = Histogram(bins, max_bins, sample_size, name=self.name)

    def calibrating(self) -> bool:
        return self.training and not self.frozen and self.clip_range is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.calibrating():
            return super().forward(x)
        self.histogram(x.clamp(max=self.cap) if self.cap is not None else x)
        return self.float_forward(x)

    def data_is_signed(self) -> bool:
        """Signedness from the histogram: more than ``tail`` of the values below zero."""
        h = self.histogram.counts
        neg = float(h[: h.numel() // 2].sum())
        return neg > self.tracker.tail * float(h.sum())

    @torch.no_grad()
    def finalize(self) -> float | None:
        """Set the range from the histogram; returns it (``None`` when nothing was observed or it is fixed).

        Under ``torch.distributed`` the histograms of all ranks are merged first (every rank must call
        ``finalize`` on its quantizers in the same order, as QuantCalibrateModule does).
        """
        all_reduce_histogram(self.histogram)
        if self.clip_range is not None or self.histogram.empty:
            return None
        signed = self.signed if self.signed is not None else self.data_is_signed()
        hist = self.histogram.positive_part() if self.signed is False else self.histogram
        r = choose_range(hist, self.method, self.bits, signed, self.power2, self.percentile)
        self.tracker.max_val.fill_(r)
        self.tracker.min_val.fill_(-r if signed else 0.0)
        if self.signed is None:
            self.data_signed = signed
        self.observed = True
        return r

    def extra_repr(self) -> str:
        return super().extra_repr() + f", method={self.method}" + (
            f", percentile={self.percentile}" if self.method == "percentile" else "")
