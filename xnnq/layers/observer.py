"""RangeObserver: what a :class:`~xnnq.layers.PACT2` needs from the object that sets its range from data.

An observer is a module the quantizer owns (``PACT2(observer=...)``) and calls in training mode while
its range is not frozen. Two exist: :class:`~xnnq.layers.RangeTracker` (QAT: a running range, the
quantizer computes with it at every step) and :class:`~xnnq.calibrate.HistogramObserver` (calibration:
the quantizer passes its input through in float, the range is chosen from a histogram at the end).
"""

from __future__ import annotations

import torch
from torch import nn


class RangeObserver(nn.Module):
    """Base class: the range state every observer keeps, and the hooks PACT2 calls.

    State (buffers, in the state dict; the same for every observer, so a state dict moves between the
    training, calibration and test wrappers): ``min_val``/``max_val`` — the range in force;
    ``num_batches`` — batches averaged into a running range (0 for an observer that chooses its range at
    the end); ``nonfinite_batches`` — batches skipped because they held NaN or Inf.

    A subclass implements ``forward(x)`` (observe one batch) and may set or override:

    * ``float_while_observing``: the quantizer passes its input through in float while observing, and the
      range exists only after :meth:`settle`;
    * :meth:`observed_signed`: whether the data has negative values, once it is known;
    * :meth:`settle`: choose the range from everything observed (called once after the last batch).
    """

    float_while_observing: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("min_val", torch.zeros(()))
        self.register_buffer("max_val", torch.zeros(()))
        self.register_buffer("num_batches", torch.zeros((), dtype=torch.long))
        self.register_buffer("nonfinite_batches", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def set_range(self, r: float, signed: bool) -> None:
        """Make the range ``[-r, r]`` (``signed``) or ``[0, r]``."""
        self.max_val.fill_(float(r))
        self.min_val.fill_(-float(r) if signed else 0.0)

    def observed_signed(self) -> bool | None:
        """Signedness of the data seen so far; ``None`` while undecided."""
        return None

    def settle(self, bits: int, signed: bool | None, power2: bool) -> tuple[float, bool] | None:
        """Choose the range for a quantizer of ``bits``/``signed``/``power2`` from what was observed and
        write it into ``min_val``/``max_val``; returns ``(range, signed)``, or ``None`` when there is nothing
        to choose (nothing observed, or a running range that is always current)."""
        return None
