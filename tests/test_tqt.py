"""Learned power-of-2 thresholds (TQT, Jain et al. 2019): forward, the paper's gradients, finite differences
on the smooth parts, numerical safety, and the LearnedRange state (freeze, state dict)."""

from __future__ import annotations

import math

import pytest
import torch

from xnnq.layers.fake_quant import fake_quantize, quant_bounds
from xnnq.layers.tqt import LOG2_MAX, LOG2_MIN, LearnedRange, tqt_fake_quantize, tqt_scale

CASES = [(8, True), (8, False), (16, True), (16, False)]


def levels(bits: int, signed: bool) -> int:
    return 1 << (bits - 1 if signed else bits)


def paper_grads(x: torch.Tensor, u: float, g: torch.Tensor, bits: int, signed: bool):
    """The paper's equations element by element in float64: (dL/dx, dL/du) with s = 2^ceil(u) / levels."""
    qmin, qmax = quant_bounds(bits, signed)
    s = 2.0 ** math.ceil(u) / levels(bits, signed)
    xd, gd = x.double(), g.double()
    z = xd / s
    r = torch.round(z)
    inside = (r >= qmin) & (r <= qmax)
    dq_du = s * math.log(2) * torch.where(inside, r - z, torch.where(r < qmin, float(qmin), float(qmax)))
    return gd * inside, (gd * dq_du).sum()


def data(bits: int, signed: bool, n: int = 20000) -> torch.Tensor:
    """Values around a range of ~5 (so u = 2.3 clips some of them), with exact ties and exact boundaries."""
    x = torch.randn(n) * 2.5
    if not signed:
        x = x.abs() * 1.3 - 0.2  # mostly positive, some negatives (clipped to 0)
    s = 2.0**3 / levels(bits, signed)
    qmin, qmax = quant_bounds(bits, signed)
    special = torch.tensor([0.5, 1.5, -0.5, qmax + 0.5, qmax - 0.5, qmin - 0.5, qmin + 0.5, qmax, qmin]) * s
    return torch.cat([x, special])


@pytest.mark.parametrize("bits,signed", CASES)
def test_forward_is_fake_quantize_with_the_power_of_2_above_the_threshold(bits, signed):
    x = data(bits, signed)
    qmin, qmax = quant_bounds(bits, signed)
    for u in (2.3, 3.0, -1.7, 0.0):
        s = tqt_scale(torch.tensor(u), bits, signed)
        assert s.item() == 2.0 ** math.ceil(u) / levels(bits, signed)
        y = tqt_fake_quantize(x, torch.tensor(u), bits, signed)
        assert torch.equal(y, fake_quantize(x, s, qmin, qmax))
        assert y.max() <= qmax * s and y.min() >= qmin * s


@pytest.mark.parametrize("bits,signed", CASES)
@pytest.mark.parametrize("u", [2.3, 3.0, 1.01])
def test_gradients_equal_the_paper_formulas(bits, signed, u):
    x = data(bits, signed).requires_grad_()
    log2_t = torch.tensor(u, requires_grad=True)
    g = torch.randn(x.shape)
    tqt_fake_quantize(x, log2_t, bits, signed).backward(g)
    gx, gu = paper_grads(x.detach(), u, g, bits, signed)
    assert torch.equal(x.grad, gx.float())
    torch.testing.assert_close(log2_t.grad.double(), gu, rtol=1e-5, atol=1e-6)
    # both kinds of element contribute: the test data clip and round
    s = 2.0 ** math.ceil(u) / levels(bits, signed)
    qmin, qmax = quant_bounds(bits, signed)
    r = torch.round(x.detach() / s)
    assert ((r > qmax) | (r < qmin)).any() and ((r >= qmin) & (r <= qmax)).any()


def test_gradient_signs_trade_range_against_resolution():
    """In-range elements under an L2 loss push the threshold down (resolution), clipped ones push it up."""
    x = torch.linspace(-3.9, 3.9, 1001)  # all inside the range 4 (u = 2)
    u = torch.tensor(2.0, requires_grad=True)
    ((tqt_fake_quantize(x, u, 8, True) - x) ** 2).sum().backward()
    assert u.grad > 0  # descent lowers t
    x = torch.linspace(-40.0, 40.0, 1001)  # mostly clipped
    u = torch.tensor(2.0, requires_grad=True)
    ((tqt_fake_quantize(x, u, 8, True) - x) ** 2).sum().backward()
    assert u.grad < 0  # descent raises t


def test_matches_torch_learnable_fake_quant_kernel():
    """An independent implementation: torch's learnable-scale fake quantization (LSQ) has dq/ds equal to the
    TQT dq/du divided by s·ln2 (the chain rule through s = 2^ceil(u)/levels with a straight-through ceil)."""
    fn = getattr(torch, "_fake_quantize_learnable_per_tensor_affine", None)
    if fn is None:
        pytest.skip("this torch build has no _fake_quantize_learnable_per_tensor_affine")
    for bits, signed in CASES:
        x = data(bits, signed).requires_grad_()
        u = torch.tensor(2.3, requires_grad=True)
        g = torch.randn(x.shape)
        y = tqt_fake_quantize(x, u, bits, signed)
        y.backward(g)
        s = tqt_scale(u, bits, signed).reshape(1).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        qmin, qmax = quant_bounds(bits, signed)
        ref = fn(x2, s, torch.zeros(1), qmin, qmax, 1.0)
        ref.backward(g)
        assert torch.equal(y, ref)
        assert torch.equal(x.grad, x2.grad)
        torch.testing.assert_close(
            u.grad, (s.grad * s.detach() * math.log(2)).reshape(()), rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("bits,signed", CASES)
def test_finite_differences_on_the_smooth_parts(bits, signed):
    """Central differences of the smooth functions the gradients differentiate, at an integer u (where
    2^ceil(u) = 2^u): clipped elements, q = qmax·s(u) or qmin·s(u), are smooth in u as they are; in-range
    elements are differentiated with round straight-through, i.e. the function x/s(u)·s(u) + r·s(u) with the
    rounding residual r held fixed; both in u with s(u) = 2^u / levels."""
    qmin, qmax = quant_bounds(bits, signed)
    u0, eps = 2.0, 1e-3
    x = data(bits, signed).double()
    s0 = 2.0**u0 / levels(bits, signed)
    r0 = torch.round(x / s0)
    inside = (r0 >= qmin) & (r0 <= qmax)
    resid = torch.where(inside, r0 - x / s0, torch.zeros_like(x))
    g = torch.randn(x.shape, dtype=torch.float64)
    ones = torch.ones_like(x)

    def surrogate(u: float) -> torch.Tensor:
        s = 2.0**u / levels(bits, signed)
        clipped = torch.where(r0 < qmin, qmin * s * ones, qmax * s * ones)
        # x/s(u)·s(u) = x does not depend on u: left out, or it swamps the difference in float64 rounding
        return (g * torch.where(inside, resid * s, clipped)).sum()

    fd = (surrogate(u0 + eps) - surrogate(u0 - eps)) / (2 * eps)
    u = torch.tensor(u0, requires_grad=True)
    tqt_fake_quantize(x.float(), u, bits, signed).backward(g.float())
    torch.testing.assert_close(u.grad.double(), fd, rtol=1e-5, atol=1e-5)
    # the input: the same surrogate in x has slope 1 inside and 0 where clipped (away from the boundaries)
    xs = x.clone().requires_grad_()
    tqt_fake_quantize(xs.float(), torch.tensor(u0), bits, signed).backward(g.float())
    away = (x / s0 - qmax - 0.5).abs().gt(1e-3) & (x / s0 - qmin + 0.5).abs().gt(1e-3)
    fd_x = torch.where(inside, g.float().double(), torch.zeros_like(g))
    assert torch.equal(xs.grad[away], fd_x[away])


@pytest.mark.parametrize("bits,signed", CASES)
def test_per_channel_equals_per_tensor_on_each_channel(bits, signed):
    w = torch.randn(4, 3, 3, 3) * torch.tensor([0.1, 1.0, 5.0, 0.01]).view(4, 1, 1, 1)
    u = torch.tensor([-3.2, 0.4, 2.0, -6.5], requires_grad=True)
    g = torch.randn(w.shape)
    wc = w.clone().requires_grad_()
    tqt_fake_quantize(wc, u, bits, signed, axis=0).backward(g)
    for c in range(4):
        wi = w[c].clone().requires_grad_()
        ui = u.detach()[c].clone().requires_grad_()
        tqt_fake_quantize(wi, ui, bits, signed).backward(g[c])
        assert torch.equal(wc.grad[c], wi.grad)
        torch.testing.assert_close(u.grad[c], ui.grad, rtol=1e-6, atol=1e-7)


def mse_best_exponent(x: torch.Tensor, bits: int, signed: bool) -> int:
    qmin, qmax = quant_bounds(bits, signed)
    errs = {
        e: float(
            ((fake_quantize(x, torch.tensor(2.0**e / levels(bits, signed)), qmin, qmax) - x) ** 2).mean()
        )
        for e in range(-6, 12)
    }
    return min(errs, key=errs.get)


@pytest.mark.parametrize("start", [LOG2_MIN, -5.0, 2.6, 12.0])
def test_learning_reaches_the_mse_optimal_power_of_2_from_anywhere(start):
    """The paper's toy problem: minimizing ||q(x) − x||² over log2 t alone with a normalized-gradient
    optimizer (Adam) ends at the power-of-2 threshold of least error (brute force), from far below, far above
    or a max-based start — including the clamp's bound, from which the gradient leads back inside."""
    torch.manual_seed(0)
    x = torch.cat(
        [torch.randn(20000), torch.randn(20) * 8]
    )  # Gaussian with a few outliers: the max is wasteful
    best = mse_best_exponent(x, 4 + 4, True)
    assert best < math.ceil(math.log2(x.abs().max()))  # clipping the outliers is better than covering them
    u = torch.tensor(start, requires_grad=True)
    opt = torch.optim.Adam([u], lr=0.1, betas=(0.9, 0.99))
    bins = []
    for _ in range(1000):
        opt.zero_grad()
        ((tqt_fake_quantize(x, u, 8, True) - x) ** 2).mean().backward()
        opt.step()
        bins.append(math.ceil(u.item()))
    # near the optimum it may step across a bin edge now and then: the last 200 steps mostly in the best bin
    assert bins[-200:].count(best) > 150


def test_hysteresis_stops_the_flips_of_a_threshold_at_its_best_power_of_2():
    """The toy problem above through LearnedRange at the documented learning rate (Adam 1e-2): with the paper's
    ceil the threshold reaches the best power of two and then keeps stepping across the edge to the next one
    (the gradient at each points to the other); a margin of a quarter octave reaches it too and stays."""
    torch.manual_seed(0)
    x = torch.cat([torch.randn(20000), torch.randn(20) * 8])
    best = mse_best_exponent(x, 8, True)
    flips, last = {}, {}
    for h in (0.0, 0.25):
        lr = LearnedRange(anchor="init", hysteresis=h)
        lr.init_from(x.abs().max())  # the max rule's octave, above the best one
        lr.train()
        opt = torch.optim.Adam(lr.parameters(), lr=1e-2)
        bins = []
        for _ in range(1000):
            opt.zero_grad()
            ((lr.fake_quantize(x, 8, True) - x) ** 2).mean().backward()
            opt.step()
            bins.append(round(math.log2(lr.range(8, True).item())))
        assert bins[0] > best and best in bins
        flips[h] = sum(a != b for a, b in zip(bins, bins[1:]))
        last[h] = bins[-300:]
    assert flips[0.0] >= 10 and last[0.0].count(best) < 300
    assert flips[0.25] <= 2 and last[0.25].count(best) == 300


def test_no_nan_for_zero_tiny_huge_and_infinite_thresholds():
    x = torch.cat([torch.randn(1000) * 3, torch.zeros(10), torch.tensor([1e30, -1e30])])
    for u0 in (float("-inf"), -1e6, LOG2_MIN, -30.0, 0.0, LOG2_MAX, 1e6, float("inf")):
        for bits, signed in CASES:
            u = torch.tensor(u0, requires_grad=True)
            xs = x.clone().requires_grad_()
            y = tqt_fake_quantize(xs, u, bits, signed)
            y.backward(torch.ones_like(y))
            assert torch.isfinite(y).all(), (u0, bits, signed)
            assert torch.isfinite(u.grad) and torch.isfinite(xs.grad).all(), (u0, bits, signed)
            s = tqt_scale(torch.tensor(u0), bits, signed)
            assert torch.isfinite(s) and s > 0
            e = math.log2(s.item()) + (bits - 1 if signed else bits)
            assert LOG2_MIN <= e <= LOG2_MAX


def test_outside_the_clamp_only_the_way_back_passes():
    x = torch.randn(1000) * 3
    # far below the clamp with everything clipped: an L2 loss wants t up -> gradient passes (negative)
    u = torch.tensor(-100.0, requires_grad=True)
    ((tqt_fake_quantize(x, u, 8, True) - x) ** 2).sum().backward()
    assert u.grad < 0
    # far below, but a loss that wants t even lower: blocked
    u = torch.tensor(-100.0, requires_grad=True)
    (-((tqt_fake_quantize(x, u, 8, True) - x) ** 2).sum()).backward()
    assert u.grad == 0
    # above a cap (log2_max): clipping wants t up: blocked; resolution wants it down: passes
    x = torch.rand(1000) * 6
    u = torch.tensor(5.0, requires_grad=True)
    ((tqt_fake_quantize(x, u, 8, False, log2_max=math.log2(6)) - x) ** 2).sum().backward()
    assert u.grad > 0
    assert tqt_scale(u, 8, False, math.log2(6)) == 8.0 / 256  # ceil(log2 6) = 3


@pytest.mark.parametrize("mode", ["half_up", "half_away", "floor", "half_even"])
def test_other_rounding_modes_forward_and_residual(mode):
    """TIDL's rounding modes: the forward is fake_quantize's with that mode, and the in-range gradient uses
    that mode's residual round(x/s) − x/s."""
    from xnnq.layers.rounding import round_tensor

    x = data(8, True).requires_grad_()
    u = torch.tensor(2.3, requires_grad=True)
    g = torch.randn(x.shape)
    y = tqt_fake_quantize(x, u, 8, True, rounding=mode)
    s = tqt_scale(u, 8, True)
    assert torch.equal(y, fake_quantize(x.detach(), s, -128, 127, rounding=mode))
    y.backward(g)
    z = x.detach().double() / s.double()
    inside = (torch.round(z) >= -128) & (torch.round(z) <= 127)  # the STE mask (fake_quant's)
    r = round_tensor(z, mode).clamp(-128, 127)
    dq_du = s.double() * math.log(2) * torch.where(inside, r - z, r)
    torch.testing.assert_close(u.grad.double(), (g.double() * dq_du).sum(), rtol=1e-5, atol=1e-5)


def test_all_zero_input_gives_zero_threshold_gradient():
    u = torch.tensor(1.5, requires_grad=True)
    tqt_fake_quantize(torch.zeros(100), u, 8, False).sum().backward()
    assert u.grad == 0


def test_frozen_value_is_used_and_the_gradient_is_zero_not_none():
    x = torch.randn(100) * 3
    u = torch.tensor(2.3, requires_grad=True)
    y = tqt_fake_quantize(x, u, 8, True, frozen_value=torch.tensor(0.5))
    assert torch.equal(y, fake_quantize(x, torch.tensor(2.0 / 128), -128, 127))  # ceil(0.5) = 1: range 2
    y.sum().backward()
    assert u.grad is not None and u.grad == 0


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="per-tensor"):
        tqt_fake_quantize(torch.randn(4, 3), torch.zeros(4), 8, True)
    with pytest.raises(ValueError, match="per-channel"):
        tqt_fake_quantize(torch.randn(4, 3), torch.zeros(3), 8, True, axis=0)
    with pytest.raises(ValueError, match="8 or 16"):
        tqt_fake_quantize(torch.randn(4), torch.zeros(()), 4, True)


def test_bfloat16_input_accumulates_in_float32():
    x = torch.randn(5000) * 3
    u = torch.tensor(2.3, requires_grad=True)
    tqt_fake_quantize(x.bfloat16(), u, 8, True).float().sum().backward()
    ub = u.grad.clone()
    u.grad = None
    tqt_fake_quantize(x.bfloat16().float(), u, 8, True).sum().backward()
    torch.testing.assert_close(ub, u.grad, rtol=1e-2, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_matches_cpu():
    x = torch.randn(10000) * 3
    g = torch.randn(10000)
    out = {}
    for dev in ("cpu", "cuda"):
        u = torch.tensor(2.3, device=dev, requires_grad=True)
        xs = x.to(dev).requires_grad_()
        y = tqt_fake_quantize(xs, u, 8, True)
        y.backward(g.to(dev))
        out[dev] = (y.cpu(), xs.grad.cpu(), u.grad.cpu())
    assert torch.equal(out["cpu"][0], out["cuda"][0]) and torch.equal(out["cpu"][1], out["cuda"][1])
    torch.testing.assert_close(out["cpu"][2], out["cuda"][2], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------- LearnedRange
# (anchor="init": the threshold alone; anchored thresholds move with their owner's statistics, test_tqt_qat.py)
def test_learned_range_init_then_learn():
    lr = LearnedRange(init_batches=2, anchor="init")
    assert lr.initializing
    lr.init_from(torch.tensor(5.0))  # the centre of 5's octave (4, 8]: the statistics' range 8
    assert lr.log2_t.item() == 2.5 and lr.initializing and lr.range(8, True) == 8.0
    lr.init_from(torch.tensor(4.0))  # a power of two is the top of its own octave
    assert lr.log2_t.item() == 1.5 and lr.range(8, True) == 4.0
    lr.init_from(torch.tensor(0.0))  # an all-zero tensor: the smallest range, not -inf
    assert lr.log2_t.item() == LOG2_MIN - 0.5 and not lr.initializing
    assert lr.range(8, True) == 2.0**LOG2_MIN


@pytest.mark.parametrize("r", [3e-4, 0.7, 1.0, 1.0001, 5.0, 6.0, 7.99, 1000.0])
def test_initial_threshold_gives_the_statistics_power_of_2_with_half_an_octave_either_side(r):
    lr = LearnedRange(anchor="init")
    lr.init_from(torch.tensor(r))
    e = math.ceil(math.log2(r))
    assert lr.range(8, False) == 2.0**e  # the scale of the statistics (pow2 ceil of the range)
    assert lr.log2_t.item() == e - 0.5  # 0.5 to the next power of two up and to the one down


def test_frozen_threshold_ignores_optimizer_momentum_and_unfreeze_resumes_from_it():
    lr = LearnedRange(anchor="init")
    lr.init_from(torch.tensor(5.0))
    opt = torch.optim.Adam(lr.parameters(), lr=0.2)
    x = torch.randn(1000) * 3
    for _ in range(3):
        opt.zero_grad()
        ((lr.fake_quantize(x, 8, True) - x) ** 2).sum().backward()
        opt.step()
    lr.frozen = True
    held = lr.log2_t.detach().clone()
    scale = lr.scale(8, True)
    for _ in range(20):  # momentum keeps moving log2_t; the threshold in force does not move
        opt.zero_grad()
        y = lr.fake_quantize(x, 8, True)
        ((y - x) ** 2).sum().backward()
        assert lr.log2_t.grad == 0
        opt.step()
        assert torch.equal(lr.scale(8, True), scale)
    assert not torch.equal(lr.log2_t.detach(), held)  # the optimizer did move the parameter
    lr.frozen = False
    assert torch.equal(lr.log2_t.detach(), held)  # learning resumes from the frozen value


def test_grad_scale_multiplies_the_threshold_gradient_only():
    x = (torch.randn(1000) * 3).requires_grad_()
    g = torch.randn(1000)
    grads = []
    for scale in (1.0, 0.25):
        lr = LearnedRange(grad_scale=scale, anchor="init")
        lr.init_from(torch.tensor(5.0))
        xs = x.detach().clone().requires_grad_()
        lr.fake_quantize(xs, 8, True).backward(g)
        grads.append((lr.log2_t.grad.clone(), xs.grad.clone()))
    torch.testing.assert_close(grads[1][0], grads[0][0] * 0.25)
    assert torch.equal(grads[1][1], grads[0][1])


def test_learned_range_state_dict_round_trip():
    a = LearnedRange((3,), init_batches=4, anchor="init")
    a.init_from(torch.tensor([1.0, 2.0, 3.0]))
    a.frozen = True
    with torch.no_grad():
        a.log2_t.add_(0.3)  # drifted after freezing
    b = LearnedRange((3,), init_batches=4, anchor="init")
    b.load_state_dict(a.state_dict())
    assert b.frozen and b.init_steps == 1
    assert torch.equal(b.log2_t, a.log2_t) and torch.equal(b.frozen_log2_t, a.frozen_log2_t)
    assert torch.equal(b.scale(8, True), a.scale(8, True))
    c = LearnedRange((3,), init_batches=1)  # anchored: the anchor is state too
    c.init_from(torch.tensor([1.0, 2.0, 3.0]))
    d = LearnedRange((3,), init_batches=1)
    d.load_state_dict(c.state_dict())
    r = torch.tensor([0.3, 9.0, 3.0])
    assert torch.equal(d.anchor, c.anchor) and torch.equal(d.scale(8, True, r=r), c.scale(8, True, r=r))
    old = {k: v for k, v in c.state_dict().items() if k != "anchor"}  # saved before anchors existed:
    old["_extra_state"] = {"frozen": False, "init_steps": 1}  # no anchor either
    with pytest.raises(ValueError, match="range_anchor='init'"):
        LearnedRange((3,)).load_state_dict(old)
    e = LearnedRange((3,), anchor="init")
    e.load_state_dict(old)
    assert torch.equal(e.log2_t, c.log2_t)


def _train_forward(lr: LearnedRange, x: torch.Tensor) -> torch.Tensor:
    """One training forward (the one that may move the octave held in force)."""
    lr.train()
    with torch.enable_grad():
        return lr.fake_quantize(x, 8, True)


def test_hysteresis_holds_the_octave_until_the_threshold_is_past_the_margin():
    """Octave k spans offsets (k - 1/2, k + 1/2] from the initial centre; with hysteresis h the held octave moves
    only when log2 t leaves (k - 1/2 - h, k + 1/2 + h], and then to the octave log2 t is in."""
    lr = LearnedRange(anchor="init", hysteresis=0.25)
    paper = LearnedRange(anchor="init")
    for m in (lr, paper):
        m.init_from(torch.tensor(5.0))  # centre 2.5: range 8
    x = torch.randn(1000) * 4
    # (log2 t, range in force with hysteresis 0.25) — the paper's ceil is 2^ceil(log2 t)
    walk = [
        (2.9, 8.0), (3.3, 16.0), (2.9, 16.0), (2.7, 8.0), (1.9, 8.0), (1.76, 8.0), (1.74, 4.0), (2.2, 4.0),
        (2.3, 8.0), (0.6, 2.0), (1.24, 2.0), (1.26, 4.0), (4.0, 16.0),
    ]  # fmt: skip
    for u, expected in walk:
        for m in (lr, paper):
            with torch.no_grad():
                m.log2_t.fill_(u)
            y = _train_forward(m, x)
            assert torch.equal(y, fake_quantize(x, m.scale(8, True), *quant_bounds(8, True)))
        assert lr.range(8, True) == expected, u
        assert paper.range(8, True) == 2.0 ** math.ceil(u), u
    lr.eval()
    with torch.no_grad():
        lr.log2_t.fill_(0.0)
        lr.fake_quantize(x, 8, True)  # neither evaluation nor a forward without grad moves the octave held
    with torch.enable_grad():
        lr.fake_quantize(x, 8, True)
    assert lr.range(8, True) == 16.0
    _train_forward(lr, x)
    assert lr.range(8, True) == 1.0  # log2 t = 0: offset -2.5, octave -3
    with pytest.raises(ValueError, match=r"hysteresis must be in \[0, 0.5\]"):
        LearnedRange(hysteresis=0.6)


@pytest.mark.parametrize("bits,signed", CASES)
def test_hysteresis_gives_the_paper_gradient_of_the_octave_held(bits, signed):
    """The threshold's gradient (and the input's) is the paper's at the octave in force, wherever log2 t is
    inside the margin; it reaches log2_t."""
    x, g = data(bits, signed), torch.randn(20009)
    lr = LearnedRange(anchor="init", hysteresis=0.5)
    lr.init_from(torch.tensor(5.0))  # octave (4, 8]
    lr.train()
    with torch.no_grad():
        lr.log2_t.fill_(1.8)  # the paper's ceil would be 2 (range 4); held: 3 (range 8)
    xs = x.clone().requires_grad_()
    lr.fake_quantize(xs, bits, signed).backward(g)
    gx, gu = paper_grads(x, 2.5, g, bits, signed)
    assert torch.equal(xs.grad, gx.float())
    torch.testing.assert_close(lr.log2_t.grad.double(), gu, rtol=1e-5, atol=1e-6)


def test_hysteresis_freezes_the_octave_held_and_the_state_round_trips():
    a = LearnedRange((3,), anchor="init", hysteresis=0.25)
    a.init_from(torch.tensor([1.0, 5.0, 100.0]))  # centres -0.5, 2.5, 6.5
    with torch.no_grad():
        a.log2_t.add_(torch.tensor([-0.6, -0.8, 0.9]))  # inside the margin, past it, past it
    a.train()
    with torch.enable_grad():
        a.fake_quantize(torch.randn(10, 3), 8, True, axis=1)
    assert torch.equal(a.held, torch.tensor([0.0, -1.0, 1.0]))
    assert torch.equal(a.range(8, True), torch.tensor([1.0, 4.0, 256.0]))
    a.frozen = True
    assert torch.equal(a.frozen_log2_t, torch.tensor([-0.5, 1.5, 7.5]))  # the centre of the octave held
    assert torch.equal(a.range(8, True), torch.tensor([1.0, 4.0, 256.0]))
    b = LearnedRange((3,), anchor="init", hysteresis=0.25)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.held, a.held) and torch.equal(b.range(8, True), a.range(8, True))
    a.frozen = False  # learning resumes from the octave held
    assert torch.equal(a.log2_t.detach(), a.frozen_log2_t) and torch.equal(a.range(8, True), b.range(8, True))
    # a state dict saved before hysteresis existed: the octave its ceil had in force is the one held
    c = LearnedRange((3,))
    c.init_from(torch.tensor([1.0, 5.0, 100.0]))
    with torch.no_grad():
        c.log2_t.add_(torch.tensor([-0.6, 0.2, 0.7]))
    old = {k: v for k, v in c.state_dict().items() if k != "held"}
    d = LearnedRange((3,), hysteresis=0.25)
    d.load_state_dict(old)
    r = torch.tensor([1.0, 5.0, 100.0])
    assert torch.equal(d.held, torch.tensor([-1.0, 0.0, 1.0]))
    assert torch.equal(d.range(8, True, r=r), c.range(8, True, r=r))
    e = LearnedRange((3,), hysteresis=0.5)  # saved with the paper's ceil by this version: the same
    e.load_state_dict(c.state_dict())
    assert torch.equal(e.range(8, True, r=r), c.range(8, True, r=r))
    # a state that holds its octave apart from log2 t cannot be read by the paper's ceil unless frozen
    with pytest.raises(ValueError, match="saved with range_hysteresis=0.25"):
        LearnedRange((3,), anchor="init").load_state_dict(a.state_dict())  # a: unfrozen again
    f = LearnedRange((3,), anchor="init")
    a.frozen = True
    f.load_state_dict(a.state_dict())
    assert torch.equal(f.range(8, True), a.range(8, True))


def _bits_of(t: torch.Tensor) -> torch.Tensor:
    """The float32 bit patterns (so that -0.0 differs from +0.0 and NaN equals NaN)."""
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("bits, signed", [(8, True), (8, False), (16, True)])
@pytest.mark.parametrize("shift, cap", [(None, None), (-1.0, None), (None, 6.0), (2.0, 6.0)])
def test_c_kernels_give_the_torch_ops_values_and_gradients_bit_for_bit(fused_mode, bits, signed, shift, cap):
    """On CPU a per-tensor learned threshold runs in two C loops (one pass each way, plus the threshold's dot
    product; a ReLU6's cap in the same pass): the output (signed zeros included), the input's gradient and the
    threshold's gradient equal the torch ops' (``x.clamp(max=cap)`` first) bit for bit, for ties, saturation,
    ±Inf, values at and above the cap and a tensor large enough to be split among threads."""
    from xnnq.layers import tqt
    from xnnq.layers.rounding import Rounding

    g = torch.Generator().manual_seed(bits + signed)
    x = torch.randn(4, 40, 33, 31, generator=g) * 3  # 163 680 elements: above the kernels' parallel threshold
    flat = x.view(-1)
    flat[:64] = torch.arange(-32, 32) * 0.0625 + 0.03125  # codes on exact .5 ties at log2 t = 0 (and -1)
    flat[64:72] = torch.tensor([1e-30, float("inf"), -float("inf"), -0.0, 0.0, -1e-30, 1e30, -1e30])
    flat[72:76] = torch.tensor(
        [6.0, 6.0000005, 5.9999995, 7.0]
    )  # at, just above, just below and above the cap
    grad_out = torch.randn(x.shape, generator=g)
    u0 = torch.tensor(0.3)
    shift_t = None if shift is None else torch.tensor(shift)
    results = {}
    for mode in ("cpu", "0"):
        fused_mode(mode)
        assert tqt._on_c_kernels(x, None, Rounding.HALF_EVEN) == (mode == "cpu")
        xi = x.clone().requires_grad_(True)
        u = u0.clone().requires_grad_(True)
        out = tqt_fake_quantize(xi, u, bits, signed, shift=shift_t, cap=cap)
        out.backward(grad_out)
        results[mode] = (out.detach(), xi.grad, u.grad)
    (out_c, gx_c, gu_c), (out_t, gx_t, gu_t) = results["cpu"], results["0"]
    if cap is not None:  # the clamp's gradient: none at the cap and above it
        assert gx_c.view(-1)[72] == 0 and gx_c.view(-1)[73] == 0 and gx_c.view(-1)[75] == 0
    assert torch.equal(_bits_of(out_c), _bits_of(out_t))
    assert torch.equal(_bits_of(gx_c), _bits_of(gx_t))
    assert torch.equal(_bits_of(gu_c), _bits_of(gu_t))
    assert torch.signbit(out_c.view(-1)[67]) and not torch.signbit(
        out_c.view(-1)[68]
    )  # -0.0 kept as in torch
    assert torch.isfinite(gu_c)


def test_c_kernels_propagate_nan_and_give_it_no_input_gradient(fused_mode):
    """A NaN input gives a NaN output and (as torch's vectorized loop) a zero input gradient; the threshold's
    gradient is NaN, in both paths."""
    x = torch.randn(2, 16, 64)
    x.view(-1)[100] = float("nan")
    results = {}
    for mode in ("cpu", "0"):
        fused_mode(mode)
        xi = x.clone().requires_grad_(True)
        u = torch.tensor(1.0, requires_grad=True)
        out = tqt_fake_quantize(xi, u, 8, True)
        out.backward(torch.ones_like(out))
        results[mode] = (out.detach(), xi.grad, u.grad)
    for out, gx, gu in results.values():
        assert torch.isnan(out.view(-1)[100]) and gx.view(-1)[100] == 0 and torch.isnan(gu)
        assert torch.isfinite(out.view(-1)[:100]).all()
    assert torch.equal(results["cpu"][1], results["0"][1])


def test_c_kernels_leave_other_cases_to_the_torch_ops(fused_mode):
    """Per channel, another rounding, a non-contiguous or non-float32 tensor: the torch ops (the same numerics)."""
    from xnnq.layers import tqt
    from xnnq.layers.rounding import Rounding

    fused_mode("cpu")
    x = torch.randn(2, 3, 4, 5)
    assert tqt._on_c_kernels(x, None, Rounding.HALF_EVEN)
    assert not tqt._on_c_kernels(x, 1, Rounding.HALF_EVEN)
    assert not tqt._on_c_kernels(x, None, Rounding.HALF_UP)
    assert not tqt._on_c_kernels(x.transpose(1, 2), None, Rounding.HALF_EVEN)
    assert not tqt._on_c_kernels(x.double(), None, Rounding.HALF_EVEN)
    assert not tqt._on_c_kernels(x[:0], None, Rounding.HALF_EVEN)


def test_c_kernels_output_takes_an_in_place_activation(fused_mode):
    """The learned quantizer's output is a tensor of its own (not a view made inside the autograd function), so an
    in-place activation after it (``Hardswish(inplace=True)``, as in MobileNetV3) trains, as on the torch ops."""
    from torch import nn

    import xnnq

    def step(mode):
        fused_mode(mode)
        torch.manual_seed(0)
        net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.Hardswish(inplace=True),
            nn.Conv2d(8, 4, 1),
            nn.ReLU6(inplace=True),
        )
        x = torch.randn(2, 3, 8, 8)
        q = xnnq.QuantTrainModule(net, x[:1], range_learning="tqt", range_init_batches=1).train()
        q(x).sum().backward()
        return q(x * 2).detach(), [p.grad.clone() for p in q.parameters() if p.grad is not None]

    (out_c, grads_c), (out_t, grads_t) = step("cpu"), step("0")
    assert torch.equal(out_c, out_t)
    assert len(grads_c) == len(grads_t) and all(torch.equal(a, b) for a, b in zip(grads_c, grads_t))
