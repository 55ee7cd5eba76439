"""HistogramObserver: the calibration observer of a PACT2 — a histogram of the data, a range chosen at the end."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..layers.observer import RangeObserver
from .histogram import Histogram, all_reduce_histogram
from .methods import METHODS, choose_range

if TYPE_CHECKING:
    from ..quantize.config import QuantConfig
    from ..quantize.plan import ActSpot


def check_method(method: str, percentile: float, where: str) -> None:
    if method not in METHODS:
        raise ValueError(f"{where}: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if not 0.0 < percentile <= 100.0:
        raise ValueError(f"{where}: percentile must be in (0, 100], got {percentile}")


class HistogramObserver(RangeObserver):
    """Counts the quantizer's input in a :class:`Histogram`; :meth:`settle` picks the range with ``method``.

    While observing, the quantizer passes its input through in float. The range is written into the
    inherited ``min_val``/``max_val`` buffers, so ``qparams``, ``clip_values``, the export and the state dict
    are those of any PACT2 (a calibrated state dict loads into ``QuantTestModule``). The histogram is not
    part of the state dict.

    The histogram counts the input clamped to ``cap`` (a ReLU6's 6). For a quantizer that replaces a ReLU
    (``signed=False``) the negative inputs are represented exactly (as the ReLU's 0) under every range, so
    the methods leave them out: the percentile, the squared error and the KL divergence are those of the
    positive outputs (without the spike at 0, which otherwise drives entropy calibration to clip hard). A
    quantizer of unknown sign (``signed=None``) is made signed when more than ``tail`` of the values are
    negative; if not, its negative values count as clipped to 0.

    The histogram spans the extremes of its sample (:class:`Histogram`), except for ``method="max"``, which
    takes the exact extremes of every batch (one more pass over each tensor).

    Args: ``method`` (``"max"``, ``"percentile"``, ``"mse"``, ``"entropy"``; see
    :mod:`xnnq.calibrate.methods`), ``percentile``, ``bins``, ``max_bins``, ``sample_size`` (see
    :class:`Histogram`), ``tail``, ``cap``, and ``name`` (the quantizer's path, for error messages).
    """

    float_while_observing = True

    def __init__(
        self,
        method: str = "mse",
        percentile: float = 99.99,
        bins: int = 2048,
        max_bins: int = 1 << 16,
        sample_size: int = 1 << 16,
        tail: float = 1e-4,
        cap: float | None = None,
        name: str = "",
    ):
        super().__init__()
        check_method(method, percentile, name or "HistogramObserver")
        self.method, self.percentile, self.tail, self.cap = method, percentile, tail, cap
        # "max" needs the exact extremes; the other methods choose from the counts of the sample
        self.histogram = Histogram(bins, max_bins, sample_size, name=name, exact_extremes=method == "max")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Count ``x`` in; returns ``x`` unchanged."""
        self.histogram.forward(x, self.cap)  # an internal module: no hooks to run
        return x

    def data_is_signed(self) -> bool:
        """More than ``tail`` of the values counted are below zero."""
        h = self.histogram.counts
        neg = float(h[: h.numel() // 2].sum())
        return neg > self.tail * float(h.sum())

    @torch.no_grad()
    def settle(self, bits: int, signed: bool | None, power2: bool) -> tuple[float, bool] | None:
        """Choose the range from the histogram (merged over ranks under ``torch.distributed`` first)."""
        all_reduce_histogram(self.histogram)
        if self.histogram.empty:
            return None
        # a ReLU quantizer leaves its negatives out; one of unknown sign found unsigned counts them as clipped
        hist = self.histogram.positive_part() if signed is False else self.histogram
        decided = signed if signed is not None else self.data_is_signed()
        r = choose_range(hist, self.method, bits, decided, power2, self.percentile)
        self.set_range(r, decided)
        return r, decided

    def extra_repr(self) -> str:
        return f"method={self.method}" + (
            f", percentile={self.percentile}" if self.method == "percentile" else ""
        )


@dataclass(frozen=True)
class HistogramRanges:
    """``QuantConfig.activation_observer`` for calibration: a :class:`HistogramObserver` per quantizer."""

    method: str = "mse"
    percentile: float = 99.99
    bins: int = 2048
    max_bins: int = 1 << 16
    sample_size: int = 1 << 16

    def __post_init__(self) -> None:
        check_method(self.method, self.percentile, "QuantCalibrateModule")

    def __call__(self, spot: ActSpot, config: QuantConfig) -> HistogramObserver:
        return HistogramObserver(
            self.method,
            self.percentile,
            self.bins,
            self.max_bins,
            self.sample_size,
            tail=config.trim_fraction,
            cap=spot.cap,
            name=spot.name,
        )
