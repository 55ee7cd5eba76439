"""The range tracker's sample and order statistics (xnnq.layers.sampling): exact, no copy of the tensor."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from xnnq.layers import RangeTracker
from xnnq.layers.sampling import block_sample, flat_view, tail_extremes


@settings(deadline=None, max_examples=80)
@given(st.integers(1, 30000), st.integers(1, 40), st.integers(0, 2**31 - 1), st.booleans(), st.booleans())
def test_tail_extremes_equal_full_topk(n, k, seed, ties, track_min):
    """The two-stage order statistic equals torch.topk of the whole sample, with and without ties."""
    k = min(k, n)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-20, 20, (n,), generator=g).float() if ties else torch.randn(n, generator=g)
    lo, hi = tail_extremes(x, k, track_min)
    assert hi == torch.topk(x, k).values[-1]
    assert lo == (torch.topk(x, k, largest=False).values[-1] if track_min else 0.0)


def test_tail_extremes_propagate_nan():
    x = torch.randn(20000)
    x[12345] = float("nan")
    assert torch.isnan(tail_extremes(x, 3)[1])
    assert torch.isnan(tail_extremes(x, 1)[1])


def test_block_sample_takes_evenly_spaced_runs():
    x = torch.arange(1 << 20, dtype=torch.float32)
    s = block_sample(x, 1 << 14, block=16)
    # every 64th run would alias with power-of-2 planes: the stride is the next odd number with no factor
    # 3, 5 or 7, 67 runs
    assert s.is_contiguous() and s.numel() == 16 * -(-(1 << 16) // 67)
    runs = s.view(-1, 16)
    assert torch.equal(runs - runs[:, :1], torch.arange(16.0).expand_as(runs))  # contiguous runs
    assert torch.equal(runs[1:, 0] - runs[:-1, 0], torch.full((runs.shape[0] - 1,), 67.0 * 16))
    assert block_sample(x[:1000], 1 << 14).numel() == 1000  # small tensors are taken whole


def test_block_sample_covers_every_channel_of_a_power_of_2_feature_map():
    """Regression: an even stride over an N x 64 x 8 x 8 map (runs of 16 = 2 rows, 4 runs per plane) sampled
    every other channel only, and the tracked range of a layer with one wide channel was half the truth."""
    channel = torch.arange(64.0).view(1, 64, 1, 1).expand(128, 64, 8, 8).contiguous()
    s = block_sample(flat_view(channel), 1 << 16)
    assert s.numel() < channel.numel() and torch.equal(s.unique(), torch.arange(64.0))
    x = torch.randn(128, 64, 8, 8, generator=torch.Generator().manual_seed(0))
    x[:, 1] *= 8  # one wide channel (odd index) sets the tail
    k = int(1e-4 * x.numel())
    hi_all = torch.topk(x.reshape(-1), k).values[-1]
    hi = RangeTracker(tail=1e-4).batch_extremes(x)[1]
    assert 0.8 < float(hi / hi_all) < 1.25


def test_flat_view_does_not_copy_channels_last():
    x = torch.randn(4, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    f = flat_view(x)
    assert f.data_ptr() == x.data_ptr() and f.numel() == x.numel()
    assert torch.equal(f.sort().values, x.reshape(-1).sort().values)


def test_tracker_on_a_large_tensor_is_the_order_statistic_of_its_sample():
    x = torch.from_numpy(np.random.default_rng(0).standard_cauchy((64, 16, 32, 32)).astype(np.float32))
    rt = RangeTracker(tail=1e-4)
    lo, hi = rt.batch_extremes(x)
    s = block_sample(flat_view(x), rt.sample_size)
    k = int(1e-4 * s.numel())
    assert k > 1
    assert hi == torch.topk(s, k).values[-1] and lo == torch.topk(s, k, largest=False).values[-1]
    # the sample's trimmed extremes are near the whole tensor's (Cauchy tails: within a factor of 2)
    k_all = int(1e-4 * x.numel())
    hi_all = torch.topk(x.reshape(-1), k_all).values[-1]
    assert 0.5 < float(hi / hi_all) < 2.0
