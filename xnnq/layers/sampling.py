"""Cheap, host-sync-free statistics of large activation tensors: a cache-friendly sample and exact
order statistics of it.

* :func:`block_sample` takes evenly spaced runs of ``block`` contiguous elements, at a stride that does not
  alias with the feature map's dimensions. A fixed stride of single
  elements touches one cache line per element, so gathering 65536 of them from an 8 MB activation costs as
  much as a full element-wise pass; runs of 16 floats (one 64-byte line) read 16x less memory for the same
  sample size.
* :func:`tail_extremes` returns the ``k``-th largest and ``k``-th smallest values of a sample. Instead of
  ``torch.topk`` over the whole sample it ranks the per-row extremes first and then only the ``k`` rows
  that can hold the top ``k`` values: exact (each of the top-``k`` values lies in a row whose extreme is
  at least the ``k``-th value, and there are at most ``k`` such rows), and it ranks far fewer values.
"""

from __future__ import annotations

import math

import torch

_ROW = 64  # row length for the two-stage order statistic


def flat_view(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a 1-d tensor in memory order, without a copy for contiguous and channels-last tensors
    (order does not matter to extremes or histograms)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).reshape(-1)
    return x.reshape(-1)


def block_sample(flat: torch.Tensor, size: int, block: int = 16) -> torch.Tensor:
    """At most about ``size`` elements of the 1-d ``flat``, as evenly spaced runs of ``block`` contiguous
    elements (the whole tensor when it is not larger than ``size``). Returns a contiguous 1-d tensor."""
    n = flat.numel()
    if size <= 0 or n <= size:
        return flat.contiguous()
    runs = n // block
    step = _non_aliasing(max(1, runs // max(1, size // block)))
    return flat[: runs * block].view(runs, block)[::step].reshape(-1)


def _non_aliasing(step: int) -> int:
    """The smallest stride ``>= step`` that is odd and, from 11 on, has no factor 3, 5 or 7 either (1 stays 1).
    A stride sharing a factor with the channel and spatial sizes of a feature map (powers of 2 mostly)
    visits the same positions of every plane and skips whole channels: on the CIFAR ResNet-20 an even
    stride put the 0.01 % tail 11 % off on average (up to 2x), an odd one 1.3 %."""
    while step > 1 and math.gcd(step, 210 if step >= 11 else 2) != 1:
        step += 1
    return step


def tail_extremes(sample: torch.Tensor, k: int, track_min: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(k-th smallest, k-th largest)`` of the 1-d contiguous ``sample`` as 0-d tensors (``k >= 1``).

    With ``track_min=False`` the first value is 0. NaN propagates (``torch.topk`` ranks NaN highest) so
    the caller can detect a non-finite batch.
    """
    n = sample.numel()
    if k == 1:
        if not track_min:
            return sample.new_zeros(()), sample.amax()
        lo, hi = torch.aminmax(sample)
        return lo, hi
    rows = n // _ROW
    if rows <= k:  # small: rank everything
        hi = torch.topk(sample, k, sorted=False).values.amin()
        lo = (
            torch.topk(sample, k, largest=False, sorted=False).values.amax()
            if track_min
            else sample.new_zeros(())
        )
        return lo, hi
    head, rest = sample[: rows * _ROW].view(rows, _ROW), sample[rows * _ROW :]
    row_hi = head.amax(dim=1)  # two reductions: aminmax(dim=1) is ~4x slower on CPU than amax + amin
    row_lo = head.amin(dim=1) if track_min else None

    def kth(row_ext: torch.Tensor, largest: bool) -> torch.Tensor:
        idx = torch.topk(row_ext, k, largest=largest, sorted=False).indices
        cand = torch.cat([head[idx].reshape(-1), rest])
        vals = torch.topk(cand, k, largest=largest, sorted=False).values
        return vals.amin() if largest else vals.amax()

    hi = kth(row_hi, True)
    lo = kth(row_lo, False) if track_min else sample.new_zeros(())
    return lo, hi


def sample_geometry(n: int, size: int, tail: float, block: int = 16) -> tuple[int, int, int, int]:
    """``(rows, length, stride, k)`` of :func:`block_sample`'s sample of ``n`` elements — the elements
    ``flat[r·stride + i]``, ``r < rows``, ``i < length`` — and the rank ``k = max(1, int(tail · sample size))``
    of its tail-trimmed extremes."""
    if size <= 0 or n <= size:
        rows, length, stride = 1, n, n
    else:
        runs = n // block
        step = _non_aliasing(max(1, runs // max(1, size // block)))
        rows, length, stride = (runs + step - 1) // step, block, step * block
    return rows, length, stride, max(1, int(tail * rows * length))


def sampled_tail_extremes(
    flat: torch.Tensor, size: int, tail: float, track_min: bool, block: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """``tail_extremes(block_sample(flat, size, block), k, track_min)`` with ``k`` of :func:`sample_geometry`,
    the same values, in one call of the C kernel (:mod:`xnnq.layers.cpu_kernels`) over the sampled runs in
    place (no sample copy). ``flat``: a contiguous 1-d float32 CPU tensor. NaN in the sample: both values NaN
    (the caller skips the batch either way)."""
    from . import cpu_kernels

    lo, hi = cpu_kernels.tail_extremes(
        flat, *sample_geometry(flat.numel(), size, tail, block), track_min
    ).unbind()
    return lo, hi
