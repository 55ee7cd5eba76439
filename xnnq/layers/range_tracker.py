"""Running activation-range estimate with trimmed tails, computed on the tensor's device.

Per batch: the tail-trimmed extremes are exact order statistics of a sample of at most ``sample_size``
elements (evenly spaced runs of contiguous elements, :func:`~xnnq.layers.sampling.block_sample`): the
``tail`` fraction (default 0.01 %) of the largest and of the smallest values is dropped. This is the limit
of a histogram percentile with infinitely fine bins, computed on a bounded sample
(:func:`~xnnq.layers.sampling.tail_extremes`), and it never synchronizes with the host.

Under ``torch.distributed`` the batch extremes are all-reduced (min of minima, max of maxima) before
averaging, so every rank holds the same range at every step (DDP's buffer broadcast would otherwise let
rank 0's statistics silently win).

Across batches: a cumulative mean for the first ``1/ema_alpha`` batches, then an exponential average
with weight ``ema_alpha`` for the new batch.

On CPU with the C kernels on (:mod:`xnnq.layers.fused`; not under ``torch.distributed``) one call ranks the
sampled runs where they lie and updates the buffers as the torch path does, with the same values bit for bit
(torch's ``lerp_`` rounding included: :func:`~xnnq.layers.cpu_kernels.lerp_fused`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from . import cpu_kernels
from .fused import on_c_path
from .observer import RangeObserver
from .sampling import block_sample, flat_view, sample_geometry, sampled_tail_extremes, tail_extremes


class RangeTracker(RangeObserver):
    """Observer: running tail-trimmed ``min_val``/``max_val`` of the tensors it sees.

    Args:
        tail: fraction trimmed from each side (``1e-4`` = 0.01 %); 0 keeps the true extremes.
        ema_alpha: weight of a new batch once the cumulative phase is over.
        sample_size: at most about this many elements (evenly spaced runs through the tensor) are ranked.
        track_min: ``False`` skips the lower tail (the minimum is known to be 0, e.g. after ReLU).
    """

    def __init__(
        self, tail: float = 1e-4, ema_alpha: float = 0.01, sample_size: int = 1 << 16, track_min: bool = True
    ):
        super().__init__()
        if not 0.0 <= tail < 0.5:
            raise ValueError(f"tail must be in [0, 0.5), got {tail}")
        self.tail, self.ema_alpha, self.sample_size, self.track_min = tail, ema_alpha, sample_size, track_min

    def batch_extremes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tail-trimmed (min, max) of one tensor, as 0-d tensors on its device."""
        flat = flat_view(x.detach())
        if on_c_path(flat):
            return sampled_tail_extremes(flat, self.sample_size, self.tail, self.track_min)  # the same values
        sample = block_sample(flat, self.sample_size).float()
        return tail_extremes(sample, max(1, int(self.tail * sample.numel())), self.track_min)

    def _c_forward(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` in one C call that writes the buffers as the torch path's ``add_`` / ``lerp_`` do
        (bit-identical; tests/test_fused.py)."""
        cpu_kernels.tracker_batch(
            flat,
            *sample_geometry(flat.numel(), self.sample_size, self.tail),
            self.track_min,
            self.min_val,
            self.max_val,
            self.num_batches,
            self.nonfinite_batches,
            self.ema_alpha,
        )
        return x

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Update the running range from ``x``; returns ``x`` unchanged.

        A batch with a non-finite extreme is not averaged in (the range is not poisoned); it is counted in
        ``nonfinite_batches`` for the caller to report.
        """
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        flat = flat_view(x.detach())
        if not distributed and on_c_path(flat) and self.max_val.dtype == torch.float32:
            return self._c_forward(flat, x)
        lo, hi = self.batch_extremes(x)
        if distributed:
            # every rank must quantize with the same range: reduce the batch extremes (no host sync)
            # a NaN does not survive MIN/MAX (gloo keeps the other rank's value): send it as -inf/+inf so
            # that every rank sees the non-finite batch and stops with the same error
            lo = torch.where(torch.isnan(lo), float("-inf"), lo)
            hi = torch.where(torch.isnan(hi), float("inf"), hi)
            dist.all_reduce(lo, op=dist.ReduceOp.MIN)
            dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        finite = torch.isfinite(lo + hi)  # (-inf) + inf is NaN: one test covers both
        n = self.num_batches.add_(finite)  # finite batches so far, this one included
        alpha = n.clamp(min=1).reciprocal().clamp_(min=self.ema_alpha)  # cumulative mean, then EMA
        # a non-finite batch moves nothing: its extremes are replaced by the current range
        self.max_val.lerp_(torch.where(finite, hi, self.max_val), alpha)
        if self.track_min:
            self.min_val.lerp_(torch.where(finite, lo, self.min_val), alpha)
        self.nonfinite_batches.add_(~finite)
        return x

    def observed_signed(self) -> bool | None:
        """Whether the running minimum is below 0, once a finite batch has been seen (one host sync)."""
        seen, negative = torch.stack([self.num_batches > 0, self.min_val < 0]).tolist()
        return negative if seen else None

    def extra_repr(self) -> str:
        return f"tail={self.tail}, ema_alpha={self.ema_alpha}, sample_size={self.sample_size}"
