"""A histogram of one tensor's values on its device, over a symmetric power-of-2 span that grows with the data.

The span is ``[-R, R]`` with ``R = 2^k`` the smallest power of two holding every value counted, split into
``bins`` (>= 2048) bins of width ``w = 2R / bins``, itself a power of two. Every power-of-2 range
``2^j >= w`` therefore falls on a bin edge, and so do the rounding boundaries of every power-of-2 grid
whose step is ``>= 2w``: for those grids each bin maps to a single code and the histogram evaluates a
quantizer's error without any binning approximation beyond the spread of values inside a bin.

When a batch exceeds the span, the span doubles (as often as needed): the bin width is kept and the
number of bins doubles, up to ``max_bins``; past that, adjacent bins are merged in pairs. Both are tensor
ops (pad, reshape-sum), so the counts stay on the device.

Host sync: one per batch (the sample's extremes, to decide the span). Calibration is not the QAT
hot path and the sync buys a histogram whose shape is always known on the host.

Cost: a sample of at most ``sample_size`` elements per batch, taken as evenly spaced runs of 16 contiguous
elements (:func:`~xnnq.layers.sampling.block_sample`: the same sample size for a sixteenth of the memory
traffic of a single-element stride), counted by :func:`add_counts` (histc's counts, vectorized). The span
follows the sample's extremes (``exact_extremes=False``, the default): every value counted lies in it, and
no pass over the whole tensor is made. With ``exact_extremes=True`` one more pass takes the exact minimum
and maximum of the whole tensor (the span and ``min_val``/``max_val`` then cover every value, which
``method="max"`` needs). The span sets the bin width (``2R / bins`` from the first batch on), so a sample
whose extremes fall a power of two below the tensor's gives bins twice finer. ``percentile`` gets the same
coverage at every power-of-2 candidate from either width (candidates fall on bin edges); ``mse`` estimates
its error from bin centers, which moves the estimate by less than the spread inside a bin; both chose the same
ranges in the tests (MobileNetV2, ResNet-20 with CIFAR-10). TensorRT's KL objective (``entropy``) depends on
the bin width and can choose another (one layer of a random-init MobileNetV2; none on ResNet-20/CIFAR-10). A ``cap`` (ReLU6) is applied to the extremes and
the sample, not to the tensor.

Non-finite values are detected in what is read: the sample (a tensor no larger than ``sample_size`` is
sampled whole), or the whole tensor with ``exact_extremes``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..layers import cpu_kernels
from ..layers.fake_quant import MIN_RANGE
from ..layers.fused import on_c_path
from ..layers.sampling import block_sample, flat_view, sample_geometry


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def bin_index(sample: torch.Tensor, r: float, bins: int) -> torch.Tensor:
    """The bin of each value of ``sample`` (int64) in ``torch.histc(sample, bins, -r, r)`` for a power-of-2 ``r``
    and ``bins`` and values within ``[-r, r]``: ``floor((x + r) · bins / 2r)``, rounded as histc rounds it
    (``x + r`` in float32), the value ``r`` in the last bin. ``x + r >= 0``, so the integer conversion (toward
    zero) is the floor."""
    return sample.add(r).mul_(bins / (2.0 * r)).long().clamp_(max=bins - 1)


def bin_counts(sample: torch.Tensor, r: float, bins: int) -> torch.Tensor:
    """``torch.histc(sample, bins, -r, r)``'s counts (int64) at a third of its cost (see :func:`bin_index`)."""
    return torch.bincount(bin_index(sample, r, bins), minlength=bins)


def add_counts(counts: torch.Tensor, sample: torch.Tensor, r: float) -> None:
    """Add the counts of ``sample`` over ``[-r, r]`` to ``counts`` (float64, in place): by ``bincount`` when the
    sample is not much smaller than the histogram, else by ``index_add_`` (no histogram-sized temporary to
    zero and add). The counts are integers either way (exact in float64 below 2^53)."""
    bins, n = counts.numel(), sample.numel()
    if 4 * n >= bins:
        counts.add_(bin_counts(sample, r, bins))
    else:
        one = torch.ones((), dtype=counts.dtype, device=counts.device)
        counts.index_add_(0, bin_index(sample, r, bins), one.expand(n))


def _c_cap(cap: float | None) -> float:
    """A cap as the C loops take it: in float32 (as ``clamp`` applies it to a float32 tensor), +inf for none."""
    return math.inf if cap is None else float(np.float32(cap))


class Histogram(nn.Module):
    """Counts of the values seen, on ``bins`` equal bins over ``[-2^k, 2^k]`` (state is not saved in the state dict).

    Args:
        bins: initial number of bins (a power of two >= 2048).
        max_bins: the number of bins may grow to this (a power of two) before bins are merged.
        sample_size: at most this many elements per batch are counted (0: all).
        exact_extremes: also take the exact minimum and maximum of every batch (one more pass over it);
            otherwise those of the sample.
        name: the owner's path, for error messages.
    """

    def __init__(
        self,
        bins: int = 2048,
        max_bins: int = 1 << 16,
        sample_size: int = 1 << 16,
        name: str = "",
        exact_extremes: bool = False,
    ):
        super().__init__()
        if not _is_pow2(bins) or bins < 2048:
            raise ValueError(f"{name or 'Histogram'}: bins must be a power of two >= 2048, got {bins}")
        if not _is_pow2(max_bins) or max_bins < bins:
            raise ValueError(
                f"{name or 'Histogram'}: max_bins must be a power of two >= bins ({bins}), got {max_bins}"
            )
        self.bins, self.max_bins, self.sample_size, self.name = bins, max_bins, sample_size, name
        self.exact_extremes = exact_extremes
        self.exponent: int | None = None  # span R = 2^exponent; None until the first batch
        self.register_buffer("counts", torch.zeros(0, dtype=torch.float64), persistent=False)
        self.register_buffer("min_val", torch.zeros(()), persistent=False)
        self.register_buffer("max_val", torch.zeros(()), persistent=False)

    # ------------------------------------------------------------------------------------ geometry
    @property
    def empty(self) -> bool:
        return self.exponent is None

    @property
    def span(self) -> float:
        """``R``: the histogram covers ``[-R, R]``."""
        return math.ldexp(1.0, self.exponent)

    @property
    def width(self) -> float:
        return 2.0 * self.span / self.counts.numel()

    def centers(self) -> torch.Tensor:
        """Bin centers (float64, on the counts' device)."""
        n = self.counts.numel()
        return (torch.arange(n, dtype=torch.float64, device=self.counts.device) - n // 2 + 0.5) * self.width

    def abs_counts(self, signed: bool = True) -> torch.Tensor:
        """Counts over ``[0, R]`` in the same bin width: of ``|x|`` (``signed``), or of ``max(x, 0)``."""
        half = self.counts.numel() // 2
        pos, neg = self.counts[half:], self.counts[:half]
        if signed:
            return pos + neg.flip(0)
        out = pos.clone()
        out[0] += neg.sum()
        return out

    def positive_part(self) -> Histogram:
        """A copy without the values below zero (for a ReLU quantizer they are represented exactly, as 0)."""
        h = Histogram(self.bins, self.max_bins, self.sample_size, self.name, self.exact_extremes)
        h.exponent = self.exponent
        h.counts = self.counts.clone()
        h.counts[: h.counts.numel() // 2] = 0
        h.min_val, h.max_val = self.min_val.clamp(min=0), self.max_val.clamp(min=0)
        return h

    # ------------------------------------------------------------------------------------ updates
    def _double(self) -> None:
        n = self.counts.numel()
        grown = torch.nn.functional.pad(self.counts, (n // 2, n // 2))
        if grown.numel() > self.max_bins:
            grown = grown.view(-1, 2).sum(1)
        self.counts = grown
        self.exponent += 1

    def forward(self, x: torch.Tensor, cap: float | None = None) -> torch.Tensor:
        """Count ``x`` in (``min(x, cap)`` when ``cap`` is given); returns ``x`` unchanged. Records nothing for
        autograd (``x`` is read detached; the state is buffers)."""
        # the C loops read memory order, so a contiguous tensor of any shape is read as it is (no view to make)
        flat = x if x.is_contiguous() else flat_view(x.detach())
        if flat.numel() == 0:
            return x
        on_c = on_c_path(flat)
        if not on_c:
            flat = flat.detach().reshape(-1)
        rows, length, stride, _ = sample_geometry(flat.numel(), self.sample_size, 0.0)
        c_cap = _c_cap(cap)
        if on_c and not self.exact_extremes:
            self._add_sample(flat, rows, length, stride, c_cap)
        elif on_c:  # the exact extremes by a C pass, then the sample's counts
            lo_f, hi_f = cpu_kernels.minmax(flat)
            self._take_extremes(min(lo_f, c_cap), min(hi_f, c_cap), flat.device)  # NaN stays NaN
            cpu_kernels.hist_add(flat, rows, length, stride, c_cap, self.span, self.counts)
        else:
            sample = block_sample(flat, self.sample_size).float()
            lo, hi = torch.aminmax(flat if self.exact_extremes else sample)
            if cap is not None:  # the extremes and the sample of min(x, cap), without a pass to clamp x
                lo, hi = lo.clamp(max=cap), hi.clamp(max=cap)
                sample = sample.clamp(max=cap)
            self._take_extremes(*torch.stack([lo, hi]).tolist(), flat.device)  # the one host sync per batch
            add_counts(self.counts, sample, self.span)
        return x

    def _add_sample(self, flat: torch.Tensor, rows: int, length: int, stride: int, c_cap: float) -> None:
        """Count the runs ``flat[r·stride + i]`` by C loops (one call: their extremes, and their counts when the
        span already holds them; the running extremes after the first batch)."""
        first = self.exponent is None
        counted, lo_f, hi_f = cpu_kernels.hist_sample(
            flat,
            rows,
            length,
            stride,
            c_cap,
            0.0 if first else self.span,
            self.counts,
            None if first else (self.min_val, self.max_val),
        )
        self._take_extremes(lo_f, hi_f, flat.device, running_set=not first)
        if not counted:
            cpu_kernels.hist_add(flat, rows, length, stride, c_cap, self.span, self.counts)

    def _take_extremes(
        self, lo_f: float, hi_f: float, device: torch.device, running_set: bool = False
    ) -> None:
        """Check a batch's extremes, grow the span to hold them (the first batch sets it) and fold them into
        ``min_val``/``max_val`` (already done when ``running_set``)."""
        amax = max(-lo_f, hi_f)
        if not math.isfinite(amax):
            raise FloatingPointError(
                f"{self.name or 'Histogram'}: the calibration tensor holds NaN or Inf. "
                "Check the calibration data and the model (run it in float first)."
            )
        k = math.ceil(math.log2(max(amax, MIN_RANGE)))
        if self.exponent is None:
            self.exponent = k
            self.counts = torch.zeros(self.bins, dtype=torch.float64, device=device)
            self.min_val = torch.tensor(lo_f, dtype=torch.float32, device=device)
            self.max_val = torch.tensor(hi_f, dtype=torch.float32, device=device)
            return
        while self.exponent < k:
            self._double()
        if not running_set:
            self.min_val.clamp_(max=lo_f)  # min(min_val, lo): neither is NaN
            self.max_val.clamp_(min=hi_f)

    def extra_repr(self) -> str:
        return f"bins={self.bins}, max_bins={self.max_bins}, sample_size={self.sample_size}" + (
            ", exact_extremes=True" if self.exact_extremes else ""
        )


_EMPTY = -(1 << 30)


def all_reduce_histogram(h) -> None:
    """Make ``h`` the histogram of every rank's values, identical on all ranks (no-op without torch.distributed).

    The span becomes the largest rank's span; bins are merged to the coarsest rank's width (every width
    is a power of two, so the bins nest exactly); counts are summed, min/max reduced.
    """
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    dev = h.min_val.device
    k = torch.tensor([_EMPTY if h.empty else h.exponent], dtype=torch.long, device=dev)
    dist.all_reduce(k, op=dist.ReduceOp.MAX)
    k = int(k)
    if k == _EMPTY:
        return  # no rank saw data
    if h.empty:  # this rank saw nothing: zeros at the finest resolution any rank can hold
        h.exponent, h.counts = k, torch.zeros(h.max_bins, dtype=torch.float64, device=dev)
        h.min_val, h.max_val = torch.full((), math.inf, device=dev), torch.full((), -math.inf, device=dev)
    while h.exponent < k:
        h._double()
    n = torch.tensor([h.counts.numel()], dtype=torch.long, device=dev)
    dist.all_reduce(n, op=dist.ReduceOp.MIN)
    h.counts = h.counts.view(int(n), -1).sum(1)
    dist.all_reduce(h.counts, op=dist.ReduceOp.SUM)
    dist.all_reduce(h.min_val, op=dist.ReduceOp.MIN)
    dist.all_reduce(h.max_val, op=dist.ReduceOp.MAX)
