import math

import pytest
import torch

from xnnq.layers.fake_quant import (
    activation_scale,
    clip_fake_quantize,
    fake_quantize,
    pow2_ceil,
    quant_bounds,
    weight_scale,
    weight_scale_from_max,
)

from conftest import is_pow2


def test_quant_bounds():
    assert quant_bounds(8, True) == (-128, 127)
    assert quant_bounds(8, False) == (0, 255)
    assert quant_bounds(16, True) == (-32768, 32767)
    assert quant_bounds(16, False) == (0, 65535)
    with pytest.raises(ValueError, match="8 or 16"):
        quant_bounds(4, True)


@pytest.mark.parametrize("r,expect", [(3.0, 4.0), (4.0, 4.0), (4.01, 8.0), (0.3, 0.5), (1e-30, 2.0**-24)])
def test_pow2_ceil(r, expect):
    assert pow2_ceil(torch.tensor(r)).item() == expect


def test_activation_scale_power_of_two():
    r = torch.tensor([0.1, 1.0, 3.7, 100.0])
    s_signed = activation_scale(r, 8, True)
    s_unsigned = activation_scale(r, 8, False)
    assert is_pow2(s_signed) and is_pow2(s_unsigned)
    assert torch.equal(s_signed * 128, pow2_ceil(r))  # range rounded up to 2^k, 2^(b-1) steps
    assert torch.equal(s_unsigned * 256, pow2_ceil(r))


@pytest.mark.parametrize("bits,signed", [(8, True), (8, False), (16, True), (16, False)])
def test_error_bound_and_saturation(bits, signed):
    scale = torch.tensor(2.0**-5)
    qmin, qmax = quant_bounds(bits, signed)
    x = torch.linspace(qmin * scale.item() * 1.5 - 1, qmax * scale.item() * 1.5 + 1, 20001)
    y = fake_quantize(x, scale, qmin, qmax)
    inside = (x >= qmin * scale) & (x <= qmax * scale)
    assert ((x - y).abs()[inside] <= scale / 2 + 1e-12).all()
    assert torch.equal(
        y[x < qmin * scale - scale], torch.full_like(y[x < qmin * scale - scale], qmin * scale.item())
    )
    assert torch.equal(
        y[x > qmax * scale + scale], torch.full_like(y[x > qmax * scale + scale], qmax * scale.item())
    )
    codes = y / scale
    assert torch.equal(codes, codes.round())  # on the grid
    assert torch.equal(fake_quantize(y, scale, qmin, qmax), y)  # idempotent


def test_matches_torch_kernel_and_ste_mask():
    x = (torch.randn(4000) * 10).requires_grad_()
    s = torch.tensor(0.0625)
    zp = torch.tensor(0, dtype=torch.int32)
    for qmin, qmax in [(-128, 127), (0, 255)]:
        y = fake_quantize(x, s, qmin, qmax)
        ref = torch.fake_quantize_per_tensor_affine(x, s, zp, qmin, qmax)
        assert torch.equal(y, ref)
        (g,) = torch.autograd.grad(y.sum(), x)
        (g_ref,) = torch.autograd.grad(ref.sum(), x)
        assert torch.equal(g, g_ref)
        codes = torch.round(x.detach() / s)
        assert torch.equal(g, ((codes >= qmin) & (codes <= qmax)).float())


def test_round_half_to_even():
    s = torch.tensor(1.0)
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5])
    assert fake_quantize(x, s, -128, 127).tolist() == [0.0, 2.0, 2.0, -0.0, -2.0]


def test_per_channel_equals_per_tensor_per_channel():
    w = torch.randn(4, 3, 3, 3) * torch.tensor([0.1, 1.0, 5.0, 0.01]).view(4, 1, 1, 1)
    s = weight_scale(w, 8, axis=0)
    y = fake_quantize(w, s, -128, 127, axis=0)
    for c in range(4):
        assert torch.equal(y[c], fake_quantize(w[c], s[c], -128, 127))
    zp = torch.zeros(4, dtype=torch.int32)
    assert torch.equal(y, torch.fake_quantize_per_channel_affine(w, s, zp, 0, -128, 127))


def test_weight_scale_requantization_is_identity():
    torch.manual_seed(1)
    for _ in range(200):
        w = torch.randn(64) * torch.rand(1) * 3
        s = weight_scale(w, 8)
        assert is_pow2(s)
        wq = fake_quantize(w, s, -128, 127)
        assert torch.equal(weight_scale(wq, 8), s)
        assert torch.equal(fake_quantize(wq, weight_scale(wq, 8), -128, 127), wq)


def test_weight_scale_edge_case_half_range():
    # max |w| just above 2^(k-1): it rounds to exactly 2^(k-1) on the 2^k grid; the rule then picks 2^(k-1)
    s_k = 1.0 / 128  # k = 0: range 1
    w = torch.tensor([0.5 + 0.4 * s_k, -0.1, 0.2])
    s = weight_scale(w, 8)
    assert s.item() == 0.5 / 128
    wq = fake_quantize(w, s, -128, 127)
    assert torch.equal(weight_scale(wq, 8), s)


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("signed", [True, False])
def test_ste_mask_at_the_half_code_edges(bits, signed):
    """Codes exactly half a step outside the range: round-half-to-even keeps qmin - 0.5 (even qmin) and
    saturates qmax + 0.5, so the gradient passes at the first and not at the second; one float32 step
    further out it is 0 on both sides."""
    qmin, qmax = quant_bounds(bits, signed)
    s = 2.0**-4
    c = torch.tensor([qmin - 0.5, qmax + 0.5, qmin + 0.0, qmax + 0.0])
    c = torch.cat([c, torch.nextafter(c[:2], torch.tensor([-math.inf, math.inf]))])
    x = (c * s).requires_grad_()
    fake_quantize(x, torch.tensor(s), qmin, qmax).sum().backward()
    codes = torch.round(c)
    assert torch.equal(x.grad, ((codes >= qmin) & (codes <= qmax)).float())
    assert x.grad.tolist() == [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("signed", [True, False])
def test_cpu_kernels_agree_bit_for_bit(signed):
    """The quantize/dequantize fast path (8-bit per-tensor on CPU) equals the element-wise path in values
    and gradients, ties and saturation included."""
    from xnnq.layers.fake_quant import _HAS_QDQ, _FakeQuantQDQ, _FakeQuantSTE

    if not _HAS_QDQ:
        pytest.skip("this torch has no quantize_per_tensor: only the element-wise path exists")
    qmin, qmax = quant_bounds(8, signed)
    g = torch.Generator().manual_seed(0)
    for e in (-7, -3, 0, 2):
        s = 2.0**e
        codes = torch.cat([torch.arange(qmin - 3, qmax + 3, 0.5), torch.randn(5000, generator=g) * 200])
        x = (codes * s).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        up = torch.randn(x.shape, generator=g)
        a = _FakeQuantQDQ.apply(x, s, qmin, qmax)
        b = _FakeQuantSTE.apply(x2, torch.tensor(s), qmin, qmax)
        assert torch.equal(a, b)
        a.backward(up), b.backward(up)
        assert torch.equal(x.grad, x2.grad)


def test_nan_propagates():
    x = torch.randn(1000)
    x[10] = float("nan")
    y = fake_quantize(x, torch.tensor(0.25), 0, 255)
    assert torch.isnan(y[10]) and torch.isfinite(y[:10]).all()


def _weight_scale_by_definition(m: torch.Tensor, bits: int) -> torch.Tensor:
    """The power-of-2 weight rule spelled out: round the range up, quantize the largest weight, round its
    quantized value up again."""
    half = float(1 << (bits - 1))
    s = pow2_ceil(m) / half
    top = torch.clamp(torch.round(m / s), max=half - 1) * s
    return pow2_ceil(top) / half


@pytest.mark.parametrize("bits", [8, 16])
def test_weight_scale_closed_form_equals_definition(bits):
    g = torch.Generator().manual_seed(1)
    half = 1 << (bits - 1)
    k = torch.randint(-30, 8, (4000,), generator=g).double()
    # largest weights on and around every code edge of the grid 2^k / 2^(b-1), plus random ones and zero
    codes = (
        torch.randint(half // 2 - 2, half + 2, (4000,), generator=g)
        + torch.tensor([0, 0.5, -0.5, 0.25])[torch.randint(0, 4, (4000,), generator=g)]
    )
    m = torch.cat([(codes * torch.exp2(k) / half).float(), torch.rand(500, generator=g) * 10, torch.zeros(1)])
    assert torch.equal(weight_scale_from_max(m, bits), _weight_scale_by_definition(m, bits))
    shift = torch.randint(0, 3, m.shape, generator=g)
    assert torch.equal(
        weight_scale_from_max(m, bits, shift=shift), _weight_scale_by_definition(m, bits) / 2.0**shift
    )


@pytest.mark.parametrize("axis", [None, 0])
def test_clip_fake_quantize_equals_clamp_then_fake_quantize(axis):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(8, 4, 3, 3, generator=g)
    w[0, 0, 0, 0], w[3, 1, 1, 1] = 9.0, -7.5  # outliers beyond the bound
    bound = torch.tensor(2.5)
    scale = weight_scale(w.clamp(-2.5, 2.5), 8, axis)
    scale = scale * (0.5 if axis is None else torch.tensor([1.0, 0.5] * 4))  # saturate some codes too
    up = torch.randn(w.shape, generator=g)
    a, b = w.clone().requires_grad_(), w.clone().requires_grad_()
    qa = clip_fake_quantize(a, bound, scale, -128, 127, axis)
    qb = fake_quantize(torch.clamp(b, -bound, bound), scale, -128, 127, axis)
    (qa * up).sum().backward()
    (qb * up).sum().backward()
    assert torch.equal(qa, qb)
    assert torch.equal(a.grad, b.grad)
    assert (a.grad == 0).sum() > 2  # the clipped outliers and the saturated codes get no gradient
    assert a.grad[0, 0, 0, 0] == 0 and a.grad[3, 1, 1, 1] == 0


def test_mask_bounds_are_float32_nextafter_for_every_bitwidth():
    """The lower straight-through bound is the float32 just below ``qmin - 0.5`` (computed without tensors,
    so torch.compile folds it), for the signed and unsigned codes of 8 and 16 bits and every qmin in between."""
    from xnnq.layers.fake_quant import _mask_bounds, quant_bounds

    qmins = {quant_bounds(bits, signed)[0] for bits in (8, 16) for signed in (True, False)}
    for qmin in sorted(qmins | set(range(-(2**15), 1, 7))):
        lo, hi = _mask_bounds(qmin, 127)
        want = torch.nextafter(torch.tensor(qmin - 0.5), torch.tensor(float("-inf"))).item()
        assert lo == want and lo < qmin - 0.5, (qmin, lo, want)
        assert hi == 127.5
