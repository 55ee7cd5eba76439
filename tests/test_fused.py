"""The fused activation fake-quantization (xnnq.layers.fused) against the unfused code path it replaces.

Numerics must not change: outputs and gradients are compared bit for bit, with the functions (saved
reference from the old code and the unfused path live) and with whole models (ResNet-20, MobileNetV2)
trained for two steps each way.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import xnnq
from xnnq.layers import cpu_kernels, fused
from xnnq.layers.fake_quant import _FakeQuantSTE, quant_bounds

from conftest import saved_bytes

# where the C batch sum follows torch's order (the rule is add_row_sum_applies'; elsewhere torch's sum is used)
needs_c_batch_sum = pytest.mark.skipif(
    not cpu_kernels.add_row_sum_applies(torch.zeros(1, 8)),
    reason="the C batch sum follows torch's order on x86 only (elsewhere torch's sum is used)",
)

REFERENCE = Path(__file__).parent / "data" / "fake_quant_reference.pt"


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


def run(x: torch.Tensor, grad: torch.Tensor, scale: float, qmin: int, qmax: int, cap: float | None):
    """(output, gradient, no-grad output) of fake_quantize_activation."""
    xr = x.detach().clone().requires_grad_(True)
    out = fused.fake_quantize_activation(xr, torch.tensor(scale), qmin, qmax, cap)
    out.backward(grad)
    with torch.no_grad():
        inference = fused.fake_quantize_activation(x, torch.tensor(scale), qmin, qmax, cap)
    return out.detach(), xr.grad, inference


def edge_values(scale: float, qmin: int, qmax: int, shape=(4, 8, 16, 16)) -> torch.Tensor:
    """Random activations over and beyond the range, with the rounding and clipping boundaries, the cap of a
    ReLU6, signed zeros, denormals, huge values and +inf, each also one ulp up and down."""
    x = torch.randn(shape) * (qmax - qmin) * scale / 3
    sp = torch.tensor([qmin - 0.5, qmin, -0.5, 0.5, 1.5, qmax - 0.5, qmax, qmax + 0.5]) * scale
    sp = torch.cat(
        [
            sp,
            torch.tensor(
                [0.0, -0.0, 6.0, 6.0 + scale / 2, 2.0**-140, -(2.0**-140), 1e30, -1e30, float("inf")]
            ),
        ]
    )
    sp = torch.cat(
        [sp, torch.nextafter(sp, torch.tensor(float("inf"))), torch.nextafter(sp, torch.tensor(-1e38))]
    )
    x.view(-1)[: sp.numel()] = sp
    return x


def test_saved_reference_of_the_unfused_code():
    """Every configuration against outputs and gradients the code before the fused kernels computed
    (tests/data/make_fake_quant_reference.py)."""
    ref = torch.load(REFERENCE, weights_only=True)
    grad = ref["grad"]
    assert len(ref["cases"]) == 16
    for case in ref["cases"]:
        qmin, qmax = quant_bounds(case["bits"], case["signed"])
        out, gx, inference = run(case["x"], grad, case["scale"], qmin, qmax, case["cap"])
        expect = case["codes"].float() * case["scale"]
        where = f"{case['bits']}-bit signed={case['signed']} cap={case['cap']} scale={case['scale']}"
        assert torch.equal(bits(out), bits(expect)), where
        assert torch.equal(bits(inference), bits(expect)), where
        assert torch.equal(bits(gx), bits(torch.where(case["mask"], grad, 0.0))), where


@pytest.mark.parametrize("nbits,signed,cap", list(itertools.product((8, 16), (False, True), (None, 6.0))))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bit_identical_to_the_unfused_path(fused_mode, nbits, signed, cap, layout):
    qmin, qmax = quant_bounds(nbits, signed)
    for scale in (2.0**-5, 2.0**-2, 4.0):
        x = edge_values(scale, qmin, qmax)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        grad = torch.randn(x.shape)
        fused_mode(False)
        ref = run(x, grad, scale, qmin, qmax, cap)
        fused_mode(True)
        new = run(x, grad, scale, qmin, qmax, cap)
        assert new[0].stride() == x.stride() and new[1].stride() == x.stride()
        # the unfused 16-bit path is element-wise and leaves -0.0 where a negative value rounds to code 0;
        # the fused kernel gives +0.0 there, as the 8-bit path does: compare 16-bit zeros by value
        canon = (lambda t: t + 0.0) if nbits == 16 else (lambda t: t)
        assert torch.equal(bits(canon(new[0])), bits(canon(ref[0]))), scale
        assert torch.equal(bits(new[1]), bits(ref[1])), scale
        assert torch.equal(bits(new[2]), bits(new[0])), scale


def test_non_power_of_2_scale_follows_the_element_wise_mask(fused_mode):
    """For a scale that is not a power of two the mask is taken on the codes ``x · (1/s)``, as in the
    element-wise path (the 8-bit CPU path put it on ``x`` against ``(qmax + 0.5) · s``, which can differ by
    one ulp at the boundary)."""
    fused_mode(True)
    for scale, (qmin, qmax) in itertools.product((0.0371, 1.7), ((0, 255), (-128, 127))):
        x = edge_values(scale, qmin, qmax).view(-1)
        x = x[torch.isfinite(x) | (x > 0)]
        grad = torch.randn(x.shape)
        xr = x.clone().requires_grad_(True)
        ref = _FakeQuantSTE.apply(xr, torch.tensor(scale), qmin, qmax)
        ref.backward(grad)
        out, gx, _ = run(x, grad, scale, qmin, qmax, None)
        assert torch.equal(out, ref.detach())
        assert torch.equal(bits(gx), bits(xr.grad))


def test_nan_propagates_without_a_separate_pass(fused_mode):
    fused_mode(True)
    x = torch.randn(2, 3, 8, 8) * 4
    x[0, 1, 2, 3] = float("nan")
    x[1, 2] = float("nan")
    out, gx, _ = run(x, torch.ones(x.shape), 2.0**-5, 0, 255, 6.0)
    assert torch.equal(torch.isnan(out), torch.isnan(x))
    assert (gx[torch.isnan(x)] == 0).all()
    fused_mode(False)
    ref, _, _ = run(torch.nan_to_num(x, nan=1.0), torch.ones(x.shape), 2.0**-5, 0, 255, 6.0)
    finite = ~torch.isnan(x)
    assert torch.equal(out[finite], ref[finite])


def test_keeps_one_byte_per_element_for_the_backward(fused_mode):
    x = torch.randn(8, 16, 32, 32, requires_grad=True)
    saved: dict[bool, int] = {}

    for mode in (True, False):
        fused_mode(mode)
        _, by_dtype = saved_bytes(fused.fake_quantize_activation, x, torch.tensor(2.0**-5), 0, 255, 6.0)
        saved[mode] = sum(by_dtype.values())
    assert saved[True] == x.numel()  # the uint8 mask
    assert saved[False] >= 2 * 4 * x.numel()  # the clamp's input and the clamped tensor


def test_a_compile_failure_falls_back_with_one_warning(fused_mode, monkeypatch):
    def broken(device):
        raise RuntimeError("no C++ compiler")

    fused_mode("auto")
    monkeypatch.setattr(fused, "_kernels", broken)
    x = torch.randn(2, 4, 8, 8)
    with pytest.warns(RuntimeWarning, match="could not be compiled"):
        out = fused.fake_quantize_activation(x, torch.tensor(0.25), -128, 127)
    assert not fused.fused_enabled()
    fused_mode(False)
    assert torch.equal(out, fused.fake_quantize_activation(x, torch.tensor(0.25), -128, 127))
    fused_mode(True)
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        fused.fake_quantize_activation(x, torch.tensor(0.25), -128, 127)


@pytest.mark.parametrize("nbits,signed,cap", [(8, False, 6.0), (8, True, None), (16, True, None)])
def test_the_compiled_kernels_match_the_c_kernels(nbits, signed, cap):
    """CPU tensors go through the C loops (xnnq/layers/cpu_kernels.py), other devices through the
    torch.compile kernels: both, run here on CPU, give the same outputs, masks and gradients."""
    qmin, qmax = quant_bounds(nbits, signed)
    for scale in (2.0**-5, 4.0, 0.0371):
        x = edge_values(scale, qmin, qmax).view(-1)
        x[::37] = float("nan")
        s = torch.tensor(scale)
        (c_out, c_mask), (t_out, t_mask) = (
            f(x, s, qmin, qmax, cap, True) for f in (fused._cpu_forward, fused._compiled_forward)
        )
        assert torch.equal(c_mask, t_mask) and c_mask.dtype == torch.uint8
        assert torch.equal(torch.isnan(c_out), torch.isnan(x))
        assert torch.equal(bits(c_out.nan_to_num()), bits(t_out.nan_to_num()))
        assert torch.equal(
            bits(fused._cpu_forward(x, s, qmin, qmax, cap, False)[0].nan_to_num()), bits(c_out.nan_to_num())
        )
        grad = torch.randn(x.shape)
        assert torch.equal(
            bits(fused.cpu_kernels.backward(grad, c_mask)), bits(fused._compiled_backward(grad, t_mask))
        )


def test_set_fused_rejects_unknown_modes():
    with pytest.raises(ValueError, match="mode must be one of"):
        fused.set_fused("sometimes")


def _train(make_model, x, y, steps: int = 2):
    torch.manual_seed(0)
    q = xnnq.QuantTrainModule(make_model(), x[:1]).train()
    opt = torch.optim.SGD(q.parameters(), lr=0.01, momentum=0.9)
    outs, grads = [], []
    for _ in range(steps):
        opt.zero_grad()
        out = q(x)
        F.cross_entropy(out, y).backward()
        outs.append(out.detach())
        grads += [p.grad.clone() for p in q.parameters()]
        opt.step()
    q.eval()
    with torch.no_grad():
        outs.append(q(x))
    return outs, grads, [b.clone() for b in q.buffers()]


def _resnet20():
    from xnnq.models.cifar_resnet import resnet20

    return resnet20()


def _mobilenet_v2():
    import torchvision

    return torchvision.models.mobilenet_v2(weights=None)


@pytest.mark.parametrize(
    "make_model,shape,classes",
    [(_resnet20, (8, 3, 32, 32), 10), (_mobilenet_v2, (2, 3, 96, 96), 1000)],
    ids=["resnet20", "mobilenet_v2"],
)
def test_models_train_bit_identically(fused_mode, make_model, shape, classes):
    """Two QAT steps (ranges tracked, BN in training mode) and an eval forward: every output, gradient and
    buffer is bit-identical with and without the fused kernels."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(shape, generator=g), torch.randint(0, classes, (shape[0],), generator=g)
    fused_mode(False)
    ref = _train(make_model, x, y)
    fused_mode(True)
    new = _train(make_model, x, y)
    for a, b in zip(ref, new):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            assert torch.equal(
                bits(u) if u.dtype == torch.float32 else u, bits(v) if v.dtype == torch.float32 else v
            )


def _graph_names(fn) -> set[str]:
    """Names of the autograd nodes reachable from ``fn``."""
    seen, stack = set(), [fn]
    while stack:
        f = stack.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        stack.extend(g for g, _ in f.next_functions)
    return {type(f).__name__ for f in seen}


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("act", [F.hardswish, F.silu])
def test_an_in_place_op_after_the_kernel_is_allowed(fused_mode, layout, act):
    """The result may be modified in place by the next op (``Hardswish(inplace=True)`` in MobileNetV3,
    ``SiLU(inplace=True)`` in EfficientNet), with the same values and gradient as the unfused path; the
    fused result is a tensor of its own in the input's layout (not a view), so the in-place op costs no
    view bookkeeping (a ``CopySlices`` node: a clone and a copy of the gradient per quantizer)."""
    x0 = torch.randn(2, 4, 8, 8) * 3
    if layout == "channels_last":
        x0 = x0.contiguous(memory_format=torch.channels_last)
    results = []
    for mode in (False, True):
        fused_mode(mode)
        x = x0.clone().requires_grad_(True)
        q = fused.fake_quantize_activation(x, torch.tensor(2.0**-4), -128, 127)
        if mode:
            assert not q._is_view() and q.stride() == x0.stride()
        y = act(q, inplace=True)
        if mode:
            assert "CopySlices" not in _graph_names(y.grad_fn)
        y.backward(torch.ones_like(y))
        results.append((y.detach(), x.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_the_default_is_the_c_kernels_on_cpu_only(fused_mode):
    fused_mode("cpu")
    assert fused.fused_enabled("cpu") and not fused.fused_enabled("cuda") and not fused.fused_enabled("meta")
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    out = fused.fake_quantize_activation(x, torch.tensor(2.0**-4), -128, 127)
    assert type(out.grad_fn).__name__ == "_ActFakeQuantBackward"
    fused_mode("auto")
    assert fused.fused_enabled("cuda")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_in_place_gives_the_same_values_and_gradients_without_a_new_tensor(fused_mode, layout):
    """``inplace=True`` (the quantizer replaced a ``ReLU(inplace=True)``): the C kernel writes into its input,
    with the out-of-place result's values and gradient bit for bit; a view is never overwritten."""
    fused_mode("cpu")
    x0 = edge_values(2.0**-4, 0, 255)
    if layout == "channels_last":
        x0 = x0.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(x0.shape)
    results = []
    for inplace in (False, True):
        w = torch.ones((), requires_grad=True)
        x = x0 * w  # a fresh non-leaf, as a layer's output
        ptr = x.data_ptr()
        out = fused.fake_quantize_activation(x, torch.tensor(2.0**-4), 0, 255, 6.0, inplace=inplace)
        assert (out.data_ptr() == ptr) is inplace and out.stride() == x0.stride()
        out.backward(grad)
        results.append((out.detach().clone(), w.grad))
        with torch.no_grad():
            y = x0.clone()
            q = fused.fake_quantize_activation(y, torch.tensor(2.0**-4), 0, 255, 6.0, inplace=inplace)
            assert (q is y) is inplace and torch.equal(bits(q), bits(results[0][0]))
    assert torch.equal(bits(results[0][0]), bits(results[1][0]))
    assert torch.equal(bits(results[0][1]), bits(results[1][1]))
    base = x0.clone()
    view = base[:2]
    out = fused.fake_quantize_activation(view, torch.tensor(2.0**-4), 0, 255, 6.0, inplace=True)
    assert out.data_ptr() != view.data_ptr() and torch.equal(base, x0)


def test_a_quantizer_with_a_hook_does_not_overwrite_its_input(fused_mode):
    """PACT2(inplace=True) writes into its input, unless a forward hook could keep that input (the per-layer
    analysis compares a quantizer's input with its output)."""
    fused_mode("cpu")
    q = xnnq.layers.PACT2(signed=False, inplace=True, clip_range=4.0).train()
    x = torch.randn(2, 8, 16, 16) * 3
    y = x.clone()
    assert q(y) is y
    seen = []
    handle = q.register_forward_hook(lambda m, args, out: seen.append(args[0].clone() - out))
    z = x.clone()
    out = q(z)
    handle.remove()
    assert out is not z and torch.equal(z, x) and seen[0].abs().max() > 0
    assert torch.equal(out, y)


class _SiLUBlock(torch.nn.Module):
    """An EfficientNet-like block written for the test: conv-BN-SiLU(inplace), squeeze-excitation
    (Sigmoid, whose backward reads its output), a linear projection and a residual add."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = torch.nn.Sequential(
            torch.nn.Conv2d(3, c, 3, padding=1), torch.nn.BatchNorm2d(c), torch.nn.SiLU(inplace=True)
        )
        self.expand = torch.nn.Sequential(
            torch.nn.Conv2d(c, 2 * c, 1), torch.nn.BatchNorm2d(2 * c), torch.nn.SiLU(inplace=True)
        )
        self.se = torch.nn.Sequential(
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Conv2d(2 * c, 4, 1),
            torch.nn.SiLU(inplace=True),
            torch.nn.Conv2d(4, 2 * c, 1),
            torch.nn.Sigmoid(),
        )
        self.project = torch.nn.Sequential(torch.nn.Conv2d(2 * c, c, 1), torch.nn.BatchNorm2d(c))
        self.head = torch.nn.Linear(c, 10)

    def forward(self, x):
        x = self.stem(x)
        e = self.expand(x)
        x = x + self.project(e * self.se(e))
        return self.head(x.mean((2, 3)))


def test_quantizers_overwrite_fresh_layer_outputs_with_identical_training(fused_mode):
    """The build lets a quantizer overwrite a conv's, an add's, a product's (the squeeze-excitation gate) or an
    in-place SiLU's output that only it reads (not a Sigmoid's: its backward reads it); training is
    bit-identical to the unfused path."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)
    q = xnnq.QuantTrainModule(_SiLUBlock(), x[:1])
    mods = dict(q.module.named_modules())
    overwrites = {s.reason for s in q.plan.acts if mods[s.name]._producer_hooks is not None}
    assert {"Conv2d+BN", "SiLU", "AddBlock", "MultBlock"} <= overwrites and "Sigmoid" not in overwrites
    # gradients masked in place: outputs read only by a conv/linear or an activation, not by an add or by two
    owned = {n for n, m in q.quantizers().items() if m._consumer_hooks is not None}
    assert {"stem.1_q", "se.3_q", "mul_q", "reducemean_q"} <= owned
    assert not owned & {"stem.2_q", "expand.2_q", "project.1_q", "head_q"}
    fused_mode(False)
    ref = _train(_SiLUBlock, x, y)
    fused_mode("cpu")
    new = _train(_SiLUBlock, x, y)
    for a, b in zip(ref, new):
        for u, v in zip(a, b):
            assert torch.equal(
                bits(u) if u.dtype == torch.float32 else u, bits(v) if v.dtype == torch.float32 else v
            )


def test_a_hook_on_the_layer_keeps_its_float_output(fused_mode):
    """A forward hook on a layer whose output a quantizer would overwrite sees that output as the layer
    computed it: with a hook registered, the quantizer writes a new tensor."""
    fused_mode("cpu")
    torch.manual_seed(0)
    q = xnnq.QuantTrainModule(_SiLUBlock(), torch.randn(1, 3, 16, 16)).train()
    q(torch.randn(4, 3, 16, 16))
    conv = q.module.get_submodule("expand.0")
    kept = []
    handle = conv.register_forward_hook(lambda m, args, out: kept.append((out, out.clone())))
    q(torch.randn(4, 3, 16, 16))
    handle.remove()
    out, copy_at_hook = kept[0]
    assert torch.equal(out, copy_at_hook)


@pytest.mark.parametrize("n", [10, 4096, 65536, 65537, 16 * 96 * 28 * 28])
def test_the_c_sample_extremes_equal_the_torch_ones(n):
    """The range tracker's tail-trimmed extremes from the C kernel (ranking the sampled runs where they lie)
    equal those of the sample copy ranked by torch.topk, ties, infinities and tails from none to 30 %."""
    from xnnq.layers.sampling import block_sample, sampled_tail_extremes, tail_extremes

    g = torch.Generator().manual_seed(n)
    for kind in ("normal", "ties", "inf"):
        x = torch.randn(n, generator=g) if kind != "ties" else torch.randint(-3, 4, (n,), generator=g).float()
        if kind == "inf":
            x[n // 3], x[n // 2] = float("inf"), float("-inf")
        for tail, track_min in itertools.product((0.0, 1e-4, 0.01, 0.3), (True, False)):
            sample = block_sample(x, 1 << 16)
            ref = tail_extremes(sample, max(1, int(tail * sample.numel())), track_min)
            new = sampled_tail_extremes(x, 1 << 16, tail, track_min)
            assert torch.equal(ref[0], new[0]) and torch.equal(ref[1], new[1]), (kind, tail, track_min)
    x[n // 2] = float("nan")
    assert torch.isnan(sampled_tail_extremes(x, n, 1e-4, True)[1])


def test_without_a_c_compiler_the_torch_ops_take_over(fused_mode, monkeypatch):
    """``CC`` naming no compiler: building the C kernels fails, one warning names the fix, and the quantizer
    and the range tracker give the torch path's results."""
    monkeypatch.setattr(cpu_kernels, "_lib", None)
    monkeypatch.setenv("CC", "/nonexistent/xnnq-test-cc")
    fused_mode("cpu")
    x = torch.randn(2, 4, 8, 8)
    with pytest.warns(RuntimeWarning, match="Set CC to a working C compiler"):
        out = fused.fake_quantize_activation(x, torch.tensor(0.25), -128, 127)
    assert not fused.fused_enabled() and not fused.c_kernels_ready()
    tracker = xnnq.layers.RangeTracker()
    tracker(x)
    fused_mode(False)
    assert torch.equal(out, fused.fake_quantize_activation(x, torch.tensor(0.25), -128, 127))
    ref = xnnq.layers.RangeTracker()
    ref(x)
    assert torch.equal(tracker.max_val, ref.max_val) and torch.equal(tracker.min_val, ref.min_val)
    monkeypatch.setattr(cpu_kernels, "_lib", None)
    fused_mode("1")
    with pytest.raises(RuntimeError, match="no C compiler"):
        fused.fake_quantize_activation(x, torch.tensor(0.25), -128, 127)


@pytest.mark.slow
def test_torch_compile_of_the_qat_model_after_freeze_bn(fused_mode):
    """``torch.compile(qmodel)`` once BN is frozen: the same forward as eager, bit for bit, and the same
    gradients up to float rounding (inductor reorders sums), with the C kernels and the in-place quantizers
    inside the compiled model."""
    import copy

    fused_mode("cpu")
    torch.manual_seed(0)
    m = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(inplace=True),
        torch.nn.Conv2d(8, 8, 3, padding=1),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 8 * 8, 10),
    )
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))
    q = xnnq.QuantTrainModule(m, x[:1]).train()
    q(x)
    xnnq.utils.freeze_bn(q)
    qc = copy.deepcopy(q)
    out_e, out_c = q(x), torch.compile(qc)(x)
    assert torch.equal(out_e, out_c)
    F.cross_entropy(out_e, y).backward()
    F.cross_entropy(out_c, y).backward()
    for a, b in zip(q.parameters(), qc.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("track_min", [True, False])
def test_the_c_range_tracker_updates_its_buffers_as_the_torch_path(fused_mode, track_min):
    """The tracker's batch on the C path (extremes, finite test and weight in one call) leaves every buffer
    bit-identical to the torch path: cumulative then EMA phase, a NaN batch, an infinite batch, and extremes
    whose sum overflows (counted as non-finite by both)."""
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(8, 16, 12, 12, generator=g) * s for s in (1.0, 3.0, 0.5, 2.0, 1.5, 4.0)]
    batches.insert(2, batches[0].clone().index_fill_(0, torch.tensor([3]), float("nan")))
    batches.insert(4, batches[1].clone().index_fill_(0, torch.tensor([1]), float("inf")))
    batches.insert(5, torch.full((4, 4, 8, 8), 3e38))
    states = []
    for mode in ("0", "cpu"):
        fused_mode(mode)
        t = xnnq.layers.RangeTracker(tail=1e-3, ema_alpha=0.25, track_min=track_min)
        for b in batches:
            t(b)
        states.append([t.min_val, t.max_val, t.num_batches, t.nonfinite_batches])
    assert int(states[0][3]) == (3 if track_min else 2)  # without the minimum, 3e38 alone is finite
    for a, b in zip(*states):
        assert torch.equal(
            bits(a) if a.dtype == torch.float32 else a, bits(b) if b.dtype == torch.float32 else b
        )


def _spread_batches(seed: int, n: int = 40) -> list[torch.Tensor]:
    """Batches whose scales spread over four decades: consecutive extremes differ by as much as the range
    itself, where rounding the product of ``lerp`` first or not gives another float often."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(2, 4, 30, 30, generator=g) * float(10 ** (torch.rand((), generator=g) * 4 - 2))
        for _ in range(n)
    ]


def _tracker_states(batches, start=None) -> list[tuple[int, ...]]:
    """The tracker's buffers (floats as their bits) after each batch."""
    t = xnnq.layers.RangeTracker(tail=1e-3, ema_alpha=0.07)
    if start is not None:  # a range set before tracking (a calibrated or loaded state, no batch counted)
        t.set_range(*start)
    states = []
    for b in batches:
        t(b)
        states.append(
            (
                int(bits(t.min_val)),
                int(bits(t.max_val)),
                int(t.num_batches),
                int(t.nonfinite_batches),
            )
        )
    return states


@pytest.mark.parametrize("start", [None, (2.75, True)])
def test_the_c_range_tracker_rounds_its_running_range_as_torchs_lerp(fused_mode, start):
    """Forty batches (weights 1, 1/2, ... down to the EMA's: both of torch's lerp formulas) from a zero or a set
    range: after every batch the C tracker's running range is the torch path's ``lerp_`` bit for bit, in the
    rounding this torch build uses (:func:`~xnnq.layers.cpu_kernels.lerp_fused`; the other rounding differs
    on these batches: checked)."""
    batches = _spread_batches(11)
    fused_mode("0")
    ref = _tracker_states(batches, start)
    fused_mode("cpu")
    assert _tracker_states(batches, start) == ref
    probed = cpu_kernels.lerp_fused()
    try:
        cpu_kernels._probed["lerp"] = not probed
        assert _tracker_states(batches, start) != ref
    finally:
        cpu_kernels._probed["lerp"] = probed


def test_the_c_range_tracker_matches_torch_built_without_fused_multiply_adds(tmp_path):
    """With ATen's baseline kernels (``ATEN_CPU_CAPABILITY=default``: ``lerp_`` rounds the product first) the
    probe picks the other rounding and the C tracker is still the torch path's bit for bit."""
    import subprocess
    import sys

    script = tmp_path / "probe.py"
    script.write_text(
        "import sys, torch\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_fused import _spread_batches, _tracker_states\n"
        "from xnnq.layers import cpu_kernels, fused\n"
        "bs = _spread_batches(11)\n"
        "fused.set_fused('0')\n"
        "ref = _tracker_states(bs)\n"
        "fused.set_fused('cpu')\n"
        "print(torch.backends.cpu.get_cpu_capability(), cpu_kernels.lerp_fused(), _tracker_states(bs) == ref)\n"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["DEFAULT", "False", "True"], proc.stdout


def test_the_c_activation_scale_equals_the_torch_ops():
    """``PACT2.qparams``' scale from one C call equals ``activation_scale`` of the torch ops for ranges on,
    one ulp around and between powers of two, below ``MIN_RANGE``, zero, infinite and NaN; with and without a
    cap; power-of-2 or not; 8 and 16 bits; signed and unsigned."""
    from xnnq.layers.fake_quant import MIN_RANGE, activation_scale, grid_levels

    p2 = torch.tensor([2.0**e for e in range(-30, 20)])
    values = torch.cat(
        [
            p2,
            torch.nextafter(p2, torch.tensor(0.0)),
            torch.nextafter(p2, torch.tensor(float("inf"))),
            torch.rand(200, generator=torch.Generator().manual_seed(0)) * 50,
            torch.tensor([0.0, -0.0, MIN_RANGE / 3, 6.0, 5.999, float("inf"), float("nan")]),
        ]
    )
    for lo_v, hi_v in itertools.product(values[::9], values[::4]):
        lo, hi = -lo_v.reshape(()), hi_v.reshape(())
        for cap, power2, nbits, signed in itertools.product(
            (None, 6.0), (True, False), (8, 16), (True, False)
        ):
            r = torch.maximum(-lo, hi)
            ref = activation_scale(r if cap is None else r.clamp(max=cap), nbits, signed, power2)
            got = cpu_kernels.act_scale(lo, hi, cap, MIN_RANGE, power2, grid_levels(nbits, signed, power2))
            assert torch.equal(bits(got), bits(ref)) or (got.isnan() and ref.isnan()), (
                lo,
                hi,
                cap,
                power2,
                nbits,
                signed,
                got,
                ref,
            )


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("cap", [None, 6.0])
@pytest.mark.parametrize("sample_size", [0, 1 << 12, 1 << 16])
def test_the_c_histogram_counts_as_the_torch_path(fused_mode, cap, sample_size, exact):
    """Calibration's histogram on the C path (the sample's extremes, or the exact ones in one pass; the sample
    binned where it lies) leaves the
    counts, the span and the extremes bit-identical to the torch path: growing spans (bins added, then
    merged), a capped range, a channels-last tensor, values on bin edges and at the span, sizes from below to
    far above the sample."""
    from xnnq.calibrate import Histogram

    g = torch.Generator().manual_seed(sample_size + (cap is not None))
    batches = [
        torch.randn(4, 8, 16, 16, generator=g) * 0.3,
        torch.randint(-64, 65, (3, 5, 7, 11), generator=g).float() / 16,  # bin edges and the span itself
        torch.randn(16, 24, 28, 28, generator=g) * 5,
        (torch.randn(2, 16, 9, 9, generator=g) * 40).to(memory_format=torch.channels_last),
        torch.randn(1000, generator=g) * 300,
        torch.randn(7, generator=g),
    ]
    states = []
    before = torch.get_num_threads()
    try:
        for mode, threads in (
            ("0", 2),
            ("cpu", 1),
            ("cpu", 2),
            ("cpu", 3),
        ):  # the C counts split over threads
            fused_mode(mode)
            torch.set_num_threads(threads)
            h = Histogram(bins=2048, max_bins=4096, sample_size=sample_size, exact_extremes=exact)
            for b in batches:
                h(b, cap)
            states.append((h.exponent, h.counts, h.min_val, h.max_val))
    finally:
        torch.set_num_threads(before)
    assert states[0][1].numel() == 4096 and states[0][1].sum() > 0
    for other in states[1:]:
        assert states[0][0] == other[0]
        for a, b in zip(states[0][1:], other[1:]):
            assert a.dtype == b.dtype and torch.equal(a, b)
    for mode in ("0", "cpu"):
        fused_mode(mode)
        bad = batches[2].clone()
        bad.view(-1)[0] = float("nan")  # the first run is in every sample
        with pytest.raises(FloatingPointError, match="^blk.relu: .*NaN or Inf"):
            Histogram(sample_size=sample_size, name="blk.relu", exact_extremes=exact)(bad, cap)
        bad = batches[2].clone()
        bad.view(-1)[8 * 16 + 3] = float("nan")  # in the ninth run: outside a sample of strided runs
        if exact or sample_size == 0:
            with pytest.raises(FloatingPointError, match="NaN or Inf"):
                Histogram(sample_size=sample_size, exact_extremes=exact)(bad, cap)
        else:  # the documented blind spot: a NaN the sample misses goes unnoticed here
            h = Histogram(sample_size=sample_size, exact_extremes=exact)
            h(bad, cap)
            assert torch.isfinite(h.counts).all() and h.counts.sum() > 0


@needs_c_batch_sum
def test_the_c_batch_sum_is_torchs_sum_bit_for_bit():
    """Bias correction's running input sum: ``total += x.sum(0)`` in one C pass reproduces torch's float32 sum
    order (a cascade of chunks; another scheme for the last columns) for batch sizes across the cascade's
    levels, row lengths around the vector blocks and the column tiles, and 1-3 threads; the count follows."""
    g = torch.Generator().manual_seed(3)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            for rows, cols in itertools.product((1, 3, 16, 17, 100, 257, 4097), (8, 31, 32, 33, 300, 40001)):
                x = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g) * 100
                total = torch.randn(cols, dtype=torch.float64, generator=g)
                ref = total + x.sum(0)
                count = torch.tensor(5)
                assert cpu_kernels.add_row_sum_applies(x)
                cpu_kernels.add_row_sum(x, total, count)
                assert torch.equal(ref, total), (threads, rows, cols)
                assert int(count) == 5 + rows
            x = torch.randn(16, 24, 28, 28, generator=g)
            total = torch.zeros(24, 28, 28, dtype=torch.float64)
            cpu_kernels.add_row_sum(x, total)
            assert torch.equal(total, x.sum(0).double())
    finally:
        torch.set_num_threads(before)
    assert not cpu_kernels.add_row_sum_applies(torch.randn(5, 7))  # too short for the vector loop


@needs_c_batch_sum
def test_the_c_workspaces_are_per_calling_thread():
    """The batch sum and the histogram keep their workspaces between calls, one per calling thread: two
    Python threads calling them at once (ctypes releases the GIL) get what each gets alone, bit for bit."""
    import threading

    from xnnq.calibrate import Histogram
    from xnnq.layers.sampling import sample_geometry

    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(64, 16, 20, 20, generator=g) * (i + 1) for i in range(2)]

    def work(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        total = torch.zeros(x.shape[1:], dtype=torch.float64)
        h = Histogram(bins=8192, sample_size=1 << 14)
        for _ in range(30):
            cpu_kernels.add_row_sum(x, total)
            h(x)
        return total, h.counts

    alone = [work(x) for x in xs]
    together: list = [None, None]
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, work(xs[i]))) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(alone, together):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    rows, length, _, _ = sample_geometry(xs[0].numel(), 1 << 14, 0.0)
    assert alone[0][1].sum() == 30 * rows * length  # every sampled value counted, every call


def test_adds_write_into_their_first_operand_without_autograd_unless_a_hook_could_keep_it(monkeypatch):
    """Calibration and evaluation (no autograd): each residual add of a ResNet-18 writes its sum into the
    quantizer output it alone reads (that quantizer's input is a conv's fresh output, read by nothing else):
    the same outputs and calibrated state as the out-of-place sums; a forward hook on the conv (it could keep
    the output) keeps that add out of place and the kept tensor intact."""
    import torchvision

    from xnnq.calibrate import QuantCalibrateModule
    from xnnq.layers.blocks import AddBlock

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(3)]
    wrapped = [QuantCalibrateModule(model, xs[0][:1]).train() for _ in range(2)]
    for m in wrapped[1].modules():
        if isinstance(m, AddBlock):
            m._first_input_hooks = None  # the out-of-place reference
    decisions = []
    real = AddBlock._may_accumulate
    monkeypatch.setattr(
        AddBlock, "_may_accumulate", lambda self, x, o: decisions.append(real(self, x, o)) or decisions[-1]
    )
    outs = [[], []]
    with torch.no_grad():
        for x in xs:
            for k, q in enumerate(wrapped):
                decisions.clear()
                outs[k].append(q(x))
                assert decisions == [k == 0] * 8
        for q in wrapped:
            q.eval()
        for k, q in enumerate(wrapped):
            decisions.clear()
            outs[k].append(q(xs[0]))
            assert decisions == [k == 0] * 8
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    sa, sb = (q.state_dict() for q in wrapped)
    assert all(torch.equal(sa[k], sb[k]) for k in sa if isinstance(sa[k], torch.Tensor))
    kept = []
    conv = wrapped[0].module.get_submodule("layer1.0.conv2")
    handle = conv.register_forward_hook(lambda m, a, out: kept.append((out, out.clone())))
    decisions.clear()
    with torch.no_grad():
        wrapped[0](xs[1])
    handle.remove()
    assert decisions == [False] + [True] * 7  # layer1.0's add is the first
    assert torch.equal(*kept[0])


def test_calibration_is_bit_identical_with_the_c_kernels(fused_mode):
    """QuantCalibrateModule on a torchvision MobileNetV2 (ReLU6 caps, residual adds, depthwise layers): the
    histograms and the bias-correction sums on the C path give the torch path's calibrated state dict, bit for
    bit (ranges, weight shifts, bias corrections), and the same outputs."""
    import torchvision

    from xnnq.calibrate import QuantCalibrateModule

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(weights=None, num_classes=10).eval()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 3, 64, 64, generator=g) * s for s in (1.0, 2.0, 0.5)]
    results = []
    for mode in ("0", "cpu"):
        fused_mode(mode)
        q = QuantCalibrateModule(model, batches[0][:1], weight_clipping="mse")
        with torch.no_grad():
            for b in batches:
                q(b)
        q.eval()
        with torch.no_grad():
            results.append((q.state_dict(), q(batches[0])))
    (sd0, out0), (sd1, out1) = results
    assert sd0.keys() == sd1.keys()
    tensors = [k for k in sd0 if isinstance(sd0[k], torch.Tensor)]
    assert len(tensors) > 100
    for k in sd0:
        assert torch.equal(sd0[k], sd1[k]) if k in tensors else sd0[k] == sd1[k], k
    assert torch.equal(out0, out1)
    assert any(sd1[k].abs().sum() > 0 for k in tensors if k.endswith("bias_correction"))


def test_owned_gradients_are_masked_in_place_unless_a_hook_could_keep_them(fused_mode, monkeypatch):
    """A quantizer whose output only a conv reads masks that conv's input gradient in place (the C backward
    runs in place, training stays bit-identical: the test above); with a forward pre-hook on the conv that
    keeps the gradient of its input (Grad-CAM style), the gradient the hook kept is not touched."""
    fused_mode("cpu")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 10, (4,), generator=g)
    q = xnnq.QuantTrainModule(_SiLUBlock(), x[:1]).train()
    calls = []
    real = cpu_kernels.backward_inplace
    monkeypatch.setattr(cpu_kernels, "backward_inplace", lambda g_, m_: calls.append(1) or real(g_, m_))
    F.cross_entropy(q(x), y).backward()
    assert len(calls) >= 4
    conv = q.module.get_submodule("project.0")
    kept = []

    def keep_input_grad(module, args):
        args[0].register_hook(lambda grad: kept.append((grad, grad.clone())))

    handle = conv.register_forward_pre_hook(keep_input_grad)
    assert not q.module.get_submodule("mul_q")._may_overwrite_gradient()
    xnnq.layers.freeze_quant_range(q)
    observer = q.module.get_submodule("mul_q").observer
    observer.min_val.mul_(0.125), observer.max_val.mul_(0.125)  # a narrow range: the mask clips
    F.cross_entropy(q(x), y).backward()
    handle.remove()
    grad, copy_at_hook = kept[0]
    assert torch.equal(grad, copy_at_hook) and bool((grad != 0).any())
    assert q.module.get_submodule("mul_q")._may_overwrite_gradient()


def test_an_add_writes_into_its_quantized_first_operand_unless_a_hook_could_keep_it(fused_mode):
    """Residual adds of a QAT ResNet-18 write the sum into the quantizer output they alone read (as the float
    model's ``out += identity``): the same values and gradients as the out-of-place sum; a forward hook on
    that quantizer, an operand of another dtype or a broadcast larger than the first keep it out of place."""
    import torchvision

    from xnnq.layers.blocks import AddBlock

    fused_mode("cpu")
    torch.manual_seed(0)
    q = xnnq.QuantTrainModule(
        torchvision.models.resnet18(weights=None, num_classes=10), torch.randn(1, 3, 32, 32)
    )
    adds = {n: m for n, m in q.module.named_modules() if isinstance(m, AddBlock)}
    assert len(adds) == 8 and all(m._first_hooks is not None for m in adds.values())
    quantizer = xnnq.layers.PACT2(signed=True).train()
    add = AddBlock()
    add.accumulate_into_first(quantizer)
    g = torch.Generator().manual_seed(0)
    inp = torch.randn(2, 4, 6, 6, generator=g, requires_grad=True)
    other = torch.randn(2, 4, 6, 6, generator=g, requires_grad=True)
    results = []
    for allowed in (True, False):
        x = quantizer(inp * 1.0)
        handle = None if allowed else quantizer.register_forward_hook(lambda m, a, out: None)
        out = add(x, other)
        if handle is not None:
            handle.remove()
        assert (out.data_ptr() == x.data_ptr()) is allowed
        out.pow(2).sum().backward()
        results.append((out.detach().clone(), inp.grad.clone(), other.grad.clone()))
        inp.grad = other.grad = None
    for a, b in zip(*results):
        assert torch.equal(a, b)
    x = quantizer(inp * 1.0)
    assert add(x, other.double()).dtype == torch.float64  # promoted: out of place
    x = quantizer(inp[:, :1] * 1.0)
    assert add(x, other).shape == other.shape  # broadcast beyond the first operand: out of place
