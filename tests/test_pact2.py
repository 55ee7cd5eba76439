import pytest
import torch

import xnnq
from xnnq.layers import PACT2, RangeTracker


def test_running_average_cumulative_then_ema():
    t = RangeTracker(tail=0.0, ema_alpha=0.25)  # cumulative for 4 batches, then EMA 0.25
    maxima = [1.0, 3.0, 2.0, 6.0, 10.0, 2.0]
    expect = 0.0
    for i, m in enumerate(maxima):
        t(torch.tensor([-m / 2, 0.0, m]))
        alpha = max(1.0 / (i + 1), 0.25)
        expect += alpha * (m - expect)
        assert t.max_val.item() == pytest.approx(expect)
    assert t.num_batches.item() == len(maxima)


def test_tail_trimming_ignores_rare_outliers():
    t = RangeTracker(tail=1e-3)
    x = torch.rand(100_000)
    x[:50] = 1000.0  # 0.05 % outliers < 0.1 % tail
    t(x)
    assert t.max_val.item() < 1.01
    t0 = RangeTracker(tail=0.0)
    t0(x)
    assert t0.max_val.item() == 1000.0


def test_pact2_replaces_relu_and_uses_power2_range():
    p = PACT2(signed=False).train()
    x = torch.randn(1000) * 3
    y = p(x)
    lo, hi = p.clip_values()
    assert lo == 0.0 and hi == 16.0  # max ~ 9-11 → 16
    assert (y >= 0).all()
    scale = p.scale()
    assert scale.item() == 16.0 / 256
    assert torch.equal(y, torch.clamp(torch.round(x.clamp(min=0) / scale), 0, 255) * scale)


def test_relu6_keeps_cap():
    p = PACT2(signed=False, cap=6.0).train()
    y = p(torch.linspace(-10, 10, 1001))
    assert y.max().item() == 6.0
    assert p.clip_values() == (0.0, 6.0)
    assert p.scale().item() == 8.0 / 256


def test_signed_from_data():
    p = PACT2().train()
    p(torch.randn(1000))
    assert p.resolved_signed() is True and p.clip_values()[0] < 0
    q = PACT2().train()
    q(torch.rand(1000))
    assert q.resolved_signed() is False and q.clip_values()[0] == 0.0


def test_freeze_unfreeze_and_mode_independence():
    model = torch.nn.Sequential(PACT2(signed=False))
    model.train()
    model(torch.rand(100) * 3)
    before = model[0].observer.max_val.clone()
    xnnq.layers.freeze_quant_range(model)
    model.eval()
    model.train()  # train()/eval() never unfreeze
    assert model[0].frozen
    model(torch.rand(100) * 100)
    assert torch.equal(model[0].observer.max_val, before)
    xnnq.layers.unfreeze_quant_range(model)
    model(torch.rand(100) * 100)
    assert model[0].observer.max_val.item() > before.item()


def test_eval_does_not_track():
    p = PACT2(signed=False).train()
    p(torch.rand(100))
    p.eval()
    before = p.observer.max_val.clone()
    p(torch.rand(100) * 50)
    assert torch.equal(p.observer.max_val, before)


def test_fixed_clip_range():
    p = PACT2(signed=True, clip_range=3.0).train()
    y = p(torch.linspace(-10, 10, 101))
    assert p.clip_values() == (-4.0, 4.0)
    assert y.min().item() == -4.0 and y.max().item() == 4.0 - 4.0 / 128
    assert p.observer.num_batches.item() == 0


def test_error_before_any_range():
    p = PACT2(name="layer1.relu").eval()
    with pytest.raises(RuntimeError, match="layer1.relu: no activation range"):
        p(torch.rand(4))


def test_nonfinite_names_layer_and_keeps_range():
    p = PACT2(name="block.act").train()
    p(torch.randn(100))
    before = (p.observer.min_val.clone(), p.observer.max_val.clone())
    x = torch.randn(100)
    x[3] = float("nan")
    x[4] = float("inf")
    with pytest.raises(FloatingPointError, match="block.act"):
        p(x)
    assert torch.equal(p.observer.min_val, before[0]) and torch.equal(p.observer.max_val, before[1])


def test_state_dict_round_trip():
    p = PACT2(signed=None).train()
    p(torch.randn(100) * 2)
    xnnq.layers.freeze_quant_range(p)
    q = PACT2(signed=None)
    q.load_state_dict(p.state_dict())
    assert q.frozen and q.observed and q.data_signed is True
    x = torch.randn(50) * 3
    assert torch.equal(p.eval()(x), q.eval()(x))


def test_buffers_follow_device_dtype():
    p = PACT2().double()
    assert p.observer.max_val.dtype == torch.float64
    names = {n for n, _ in p.named_buffers()}
    assert {"observer.min_val", "observer.max_val", "observer.num_batches"} <= names
