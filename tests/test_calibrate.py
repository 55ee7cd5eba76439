"""Post-training calibration: histogram range methods vs brute force, bias correction, 16-bit overrides."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import xnnq
from xnnq.calibrate import Histogram, HistogramObserver, QuantCalibrateModule
from xnnq.calibrate.histogram import add_counts, bin_counts
from xnnq.calibrate.methods import grid_step
from xnnq.layers.fake_quant import grid_levels

from conftest import observe


# ------------------------------------------------------------------------------------------ data
def gaussian_outliers(n=100_000):
    x = torch.randn(n)
    x[torch.randint(0, n, (n // 10_000,))] = torch.randn(n // 10_000) * 20  # a few wild values
    return x


def uniform(n=100_000):
    return torch.rand(n) * 6 - 3


def half_normal_pre_relu(n=100_000):
    return torch.randn(n) * 1.7  # fed to a ReLU quantizer: the positive half is what it represents


CASES = [
    ("gauss+outliers", gaussian_outliers, None),
    ("uniform", uniform, True),
    ("relu", half_normal_pre_relu, False),
]


def calibrated(x: torch.Tensor, method: str, signed, power2=True, bits=8, **kw) -> xnnq.layers.PACT2:
    q = xnnq.layers.PACT2(
        bits=bits,
        signed=signed,
        power2=power2,
        observer=HistogramObserver(method=method, sample_size=0, **kw),
    ).train()
    for chunk in x.chunk(4):  # several batches: the span grows as the outliers arrive
        q(chunk)
    q.settle_range()
    return q.eval()


# --------------------------------------------------------------------------- brute-force objectives
def pow2_grid(x: torch.Tensor, below: int = 12) -> list[float]:
    top = math.ceil(math.log2(float(x.abs().max())))
    return [2.0**k for k in range(top, top - below, -1)]


def represented(x: torch.Tensor, signed) -> np.ndarray:
    """The values the quantizer must represent (a ReLU quantizer's negatives are exact zeros)."""
    return x[x > 0].numpy() if signed is False else x.numpy()


def brute_mse(q: xnnq.layers.PACT2, x: torch.Tensor, r: float) -> float:
    """Exact squared error of the real quantizer with range ``r`` on the raw samples."""
    q.observer.max_val.fill_(r)
    q.observer.min_val.fill_(-r if q.resolved_signed() else 0.0)
    with torch.no_grad():
        return float(((q(x).double() - q.float_forward(x).double()) ** 2).sum())


def brute_kl(a: np.ndarray, r: float, width: float, nlev: int) -> float:
    """TensorRT's KL(P||Q) computed from raw values with numpy."""
    i = round(r / width)
    h, _ = np.histogram(a, bins=i, range=(0.0, r))
    h = h.astype(np.float64)
    p = h.copy()
    p[-1] += (a > r).sum()
    groups = np.arange(i) * nlev // i
    q = np.zeros(i)
    for g in np.unique(groups):
        sel = (groups == g) & (h > 0)
        if sel.any():
            q[sel] = h[groups == g].sum() / sel.sum()
    p, q = p / p.sum(), q / q.sum()
    k = p > 0
    return math.inf if (q[k] == 0).any() else float((p[k] * np.log(p[k] / q[k])).sum())


@pytest.mark.parametrize("name,make,signed", CASES)
def test_pow2_max_and_percentile_equal_brute_force(name, make, signed):
    x = make()
    a = np.abs(represented(x, signed))
    q = calibrated(x, "max", signed)
    assert q.observer.max_val.item() == min(r for r in pow2_grid(x) if r >= a.max())
    for p in (99.0, 99.99):
        q = calibrated(x, "percentile", signed, percentile=p)
        want = min(r for r in pow2_grid(x) if (a <= r).mean() >= p / 100)
        assert q.observer.max_val.item() == want, (name, p)


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("name,make,signed", CASES)
def test_pow2_mse_equals_brute_force(name, make, signed, bits):
    x = make()
    q = calibrated(x, "mse", signed, bits=bits)
    chosen = q.observer.max_val.item()
    errs = {r: brute_mse(q, x, r) for r in pow2_grid(x)}
    assert chosen == min(errs, key=errs.get), (name, chosen, errs)


@pytest.mark.parametrize("name,make,signed", CASES)
def test_pow2_entropy_equals_brute_force(name, make, signed):
    x = make()
    q = calibrated(x, "entropy", signed)
    sgn = q.resolved_signed()
    a = np.abs(represented(x, signed))
    w, nlev = q.observer.histogram.width, grid_levels(8, sgn)
    kl = {r: brute_kl(a, r, w, nlev) for r in pow2_grid(x) if round(r / w) >= nlev}
    assert q.observer.max_val.item() == min(kl, key=kl.get), (name, kl)


def test_signedness_from_data():
    assert calibrated(gaussian_outliers(), "mse", None).resolved_signed() is True
    assert calibrated(torch.rand(10_000), "mse", None).resolved_signed() is False


@pytest.mark.parametrize("name,make,signed", CASES)
def test_free_scale_mse_and_percentile_near_brute_force(name, make, signed):
    x = make(40_000)
    q = calibrated(x, "mse", signed, power2=False)
    chosen = q.observer.max_val.item()
    top = float(x.abs().max())
    grid = np.linspace(top / 100, top, 200)
    best = min(brute_mse(q, x, float(r)) for r in grid)
    assert brute_mse(q, x, chosen) <= best * 1.02
    q = calibrated(x, "percentile", signed, power2=False, percentile=99.9)
    a = np.abs(represented(x, signed))  # the tail is sparse: within the neighbouring order statistics
    lo, hi = (
        np.percentile(a, 99.9 - 0.02) - q.observer.histogram.width,
        np.percentile(a, 99.9 + 0.02) + q.observer.histogram.width,
    )
    assert lo <= q.observer.max_val.item() <= hi


def test_histogram_growth_keeps_counts_and_merges():
    h = Histogram(bins=2048, max_bins=4096, sample_size=0)
    h(torch.full((10,), 0.3))
    assert h.span == 0.5 and h.counts.numel() == 2048
    h(torch.tensor([3.1]))  # span 0.5 -> 4: 2048 -> 4096 bins, then pairs merged twice
    assert h.span == 4.0 and h.counts.numel() == 4096 and h.width == 8.0 / 4096
    assert float(h.counts.sum()) == 11
    c = h.centers()
    assert float(h.counts[(c - 0.3).abs().argmin()]) == 10 and float(h.counts[(c - 3.1).abs().argmin()]) == 1


@pytest.mark.parametrize("r,bins", [(8.0, 2048), (1.0, 65536), (2.0**-10, 4096), (64.0, 8192)])
def test_bin_counts_are_histc_counts(r, bins):
    """Including values one ulp around every bin edge (where histc's float32 ``x + r`` rounds) and both ends."""
    x = (torch.randn(100_000) * r / 3).clamp(-r, r)
    edges = (torch.arange(bins + 1, dtype=torch.float32) - bins // 2) * (2 * r / bins)
    near = torch.cat(
        [
            edges,
            torch.nextafter(edges, torch.tensor(math.inf)),
            torch.nextafter(edges, torch.tensor(-math.inf)),
        ]
    )
    x = torch.cat([x, near.clamp(-r, r)])
    assert torch.equal(bin_counts(x, r, bins).float(), torch.histc(x, bins=bins, min=-r, max=r))


def test_histogram_of_a_capped_tensor_counts_min_x_cap():
    """The cap is applied to the extremes and the sample: the histogram equals that of ``x.clamp(max=cap)``."""
    x = torch.randn(3, 8, 32, 32) * 5
    capped, plain = Histogram(sample_size=1 << 12), Histogram(sample_size=1 << 12)
    for chunk in x.chunk(3):
        capped(chunk, cap=6.0)
        plain(chunk.clamp(max=6.0))
    assert capped.exponent == plain.exponent
    assert torch.equal(capped.counts, plain.counts)
    assert torch.equal(capped.min_val, plain.min_val) and torch.equal(capped.max_val, plain.max_val)


def test_nonfinite_calibration_data_is_named():
    q = xnnq.layers.PACT2(name="blk.relu", observer=HistogramObserver(method="mse", name="blk.relu")).train()
    with pytest.raises(FloatingPointError, match="blk.relu"):
        q(torch.tensor([1.0, float("nan")]))


# --------------------------------------------------------------------------------- whole models
class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.body1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.body2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(self.bn1(self.body1(x))) + x
        x = self.body2(x)
        return self.head(x.mean((2, 3)))


def toy() -> Toy:
    m = Toy()
    with torch.no_grad():
        for bn in (m.bn, m.bn1):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2)
            bn.bias.uniform_(-0.5, 0.5)
    return m.eval()


def test_overrides_reach_exactly_the_named_layers():
    q = QuantCalibrateModule(toy(), torch.randn(1, 3, 8, 8), bitwidth_overrides={"body1": 16, "last": 16})
    weights = {
        n: m.weight_bits
        for n, m in q.module.named_modules()
        if isinstance(m, xnnq.layers.QuantConv2d | xnnq.layers.QuantLinear)
    }
    assert weights == {"stem": 8, "body1": 16, "body2": 8, "head": 16}
    acts = {n: m.bits for n, m in q.quantizers().items()}
    layer_of = {a.name: a.layer for a in q.plan.acts}
    assert (
        {n for n, b in acts.items() if b == 16}
        == {n for n in acts if layer_of[n] in ("body1", "head")}
        != set()
    )
    assert all(isinstance(m.observer, HistogramObserver) for m in q.quantizers().values())
    assert q.plan.sixteen_bit_layers() == ["body1", "head"]
    with pytest.raises(ValueError, match="nope"):
        QuantCalibrateModule(toy(), torch.randn(1, 3, 8, 8), bitwidth_overrides={"nope": 16})


def channel_mean_error(q, m, x):
    with torch.no_grad():
        return (q(x) - m(x)).mean((0, 2, 3)).abs()


def test_bias_correction_removes_each_channels_own_mean_error():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.BatchNorm2d(16)).eval()
    with torch.no_grad():
        m[0].weight[8:] *= 0.03  # small channels: coarse on the per-tensor power-of-2 grid
        m[1].running_var.uniform_(0.5, 2)
    data = [torch.randn(32, 4, 12, 12) + 0.8 for _ in range(4)]
    plain = observe(QuantCalibrateModule(m, data[0][:1], bias_correction=False), data)
    fixed = observe(QuantCalibrateModule(m, data[0][:1], bias_correction=True), data)
    x = torch.cat(data)
    before, after = channel_mean_error(plain, m, x), channel_mean_error(fixed, m, x)
    assert (after < before).all(), (before, after)
    assert after.mean() < 0.2 * before.mean()
    # the correction is exactly the layer's weight-quantization mean error on the calibration data
    layer, bn = fixed.module.get_submodule("0"), fixed.module.get_submodule("1")
    with torch.no_grad():
        w, _ = layer.folded_weight_bias(bn)
        wq = layer.quantize_weight(w)[0]
        measured = (nn.functional.conv2d(x, wq, padding=1) - nn.functional.conv2d(x, w, padding=1)).mean(
            (0, 2, 3)
        )
    assert torch.allclose(layer.bias_correction, measured, atol=1e-5)


def test_calibrated_state_dict_round_trips_into_test_module():
    m, dummy = toy(), torch.randn(1, 3, 8, 8)
    data = [torch.randn(16, 3, 8, 8) for _ in range(3)]
    q = observe(QuantCalibrateModule(m, dummy, method="entropy", weight_clipping="mse"), data)
    assert any(
        float(layer.bias_correction.abs().max()) > 0
        for layer in q.module.modules()
        if hasattr(layer, "bias_correction")
    )
    t = xnnq.QuantTestModule(m, dummy)
    t.load_state_dict(q.state_dict())
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(t(x), q(x))


def test_no_call_counting_and_explicit_errors():
    m, dummy = toy(), torch.randn(1, 3, 8, 8)
    q = QuantCalibrateModule(m, dummy).eval()  # never calibrated
    with pytest.raises(RuntimeError, match="no activation range"):
        q(dummy)
    one = observe(QuantCalibrateModule(m, dummy, method="max"), [torch.randn(8, 3, 8, 8)])
    assert not one.calibrating and one(dummy).shape == (1, 5)
    big = torch.randn(8, 3, 8, 8) * 10  # more data later: the same histograms continue
    r0 = one.quantizers()["input_q"].observer.max_val.item()
    observe(one, [big])
    assert one.quantizers()["input_q"].observer.max_val.item() > r0
    with pytest.raises(ValueError, match="method"):
        QuantCalibrateModule(m, dummy, method="kl")


def test_calibration_forward_is_the_float_model():
    m, dummy = toy(), torch.randn(1, 3, 8, 8)
    q = QuantCalibrateModule(m, dummy).train()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(q(x), m(x), atol=1e-5)
        assert all(not bn.training for bn in q.modules() if isinstance(bn, nn.BatchNorm2d))


def test_calibration_runs_dropout_and_stochastic_depth_as_in_inference():
    """Dropout and StochasticDepth in the user's model (a torchvision EfficientNet has both) are off while
    calibrating: two calibration forwards of one batch agree with each other and with the float model in eval
    mode, and the model left to eval() is unchanged by it."""
    import torchvision

    torch.manual_seed(0)
    m = torchvision.models.efficientnet_b0(weights=None, num_classes=10, stochastic_depth_prob=0.5)
    m.train()
    x = torch.randn(2, 3, 64, 64)
    q = QuantCalibrateModule(m, x[:1])
    assert q.training and q.calibrating
    with torch.no_grad():
        a, b = q(x), q(x)
        ref = m.eval()(x)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, ref, rtol=1e-4, atol=1e-4)
    assert all(not d.training for d in q.modules() if isinstance(d, nn.Dropout))
    assert all(p.training for p in q.quantizers().values())


def test_calibration_grid_is_the_core_grid():
    """The methods score candidate ranges on the grid PACT2 then uses (one definition of the grid)."""
    for bits in (8, 16):
        for signed in (True, False):
            for r in (2.0**-3, 1.0, 8.0):  # power-of-2 candidates: the same step exactly
                assert grid_step(r, bits, signed, True) == float(
                    xnnq.layers.activation_scale(torch.tensor(r), bits, signed, True)
                )
            for r in (0.3, 1.7, 5.0):  # free ranges: the same step (float64 here, float32 there)
                assert math.isclose(
                    grid_step(r, bits, signed, False),
                    float(xnnq.layers.activation_scale(torch.tensor(r), bits, signed, False)),
                    rel_tol=1e-6,
                )


@pytest.mark.parametrize("bins,n", [(2048, 60_000), (65536, 3000), (4096, 1024)])
def test_sparse_and_dense_count_updates_are_histc_counts(bins, n):
    """Both ways ``add_counts`` adds a sample (``bincount`` for a dense sample, ``index_add_`` for one much
    smaller than the histogram) give histc's counts, accumulated exactly."""
    r = 4.0
    counts = torch.zeros(bins, dtype=torch.float64)
    expected = torch.zeros(bins, dtype=torch.float64)
    for seed in range(3):
        x = (torch.randn(n, generator=torch.Generator().manual_seed(seed)) * r / 3).clamp(-r, r)
        add_counts(counts, x, r)
        expected += torch.histc(x, bins=bins, min=-r, max=r).double()
    assert torch.equal(counts, expected) and float(counts.sum()) == 3 * n


@pytest.mark.parametrize("inplace", [True, False])
def test_calibration_relu_works_in_place_exactly_when_the_float_model_did(inplace):
    """A quantizer that replaced ``ReLU(inplace=True)`` clamps its input in place while calibrating (no new
    activation-sized tensor), as the float model does; one that replaced an out-of-place ReLU leaves the
    tensor it was given unchanged. The output is the float model's either way."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.relu = nn.ReLU6(inplace=inplace)
            self.head = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.head(self.relu(self.conv(x)))

    model = Net().eval()
    calib = QuantCalibrateModule(model, torch.zeros(1, 3, 16, 16), bias_correction=False)
    relu = calib.module.get_submodule("relu")
    assert relu.inplace is inplace
    seen = {}
    relu.register_forward_pre_hook(lambda m, a: seen.update(x=a[0], before=a[0].clone()))
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        out = calib(x)
    assert torch.equal(seen["x"], seen["before"].clamp(0, 6) if inplace else seen["before"])
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    assert type(model.relu) is nn.ReLU6 and model.relu.inplace is inplace  # the user's model is untouched


# ------------------------------------------------------------------------------- sampled extremes
def calibrated_state(model, batches, method, exact):
    """State dict of ``model`` calibrated on ``batches`` with the histograms spanning the sample's extremes
    (the default) or the exact ones (``exact``)."""
    q = QuantCalibrateModule(model, batches[0][:1], method=method)
    for obs in q.modules():
        if isinstance(obs, Histogram):
            obs.exact_extremes = exact
    return observe(q, batches).state_dict()


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        same = torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
        assert same, f"{k} differs between sampled and exact extremes"


@pytest.mark.parametrize("method", ["mse", "percentile"])
def test_sampled_extremes_calibrate_as_the_exact_ones_on_mobilenet_v2(method):
    """The histograms' span from the sample (no pass over the whole tensor) leaves every calibrated range, weight
    and bias correction of a torchvision MobileNetV2 as with the exact extremes. (``entropy`` differs here in one
    layer: TensorRT's KL objective depends on the bin width, which follows the span; see the histogram's
    docstring. On ResNet-20 with CIFAR-10 it does not, next test.)"""
    import torchvision

    m = torchvision.models.mobilenet_v2(weights=None, num_classes=10).eval()
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(8, 3, 96, 96, generator=g) for _ in range(2)]
    assert_same_state(calibrated_state(m, batches, method, False), calibrated_state(m, batches, method, True))


@pytest.mark.data
def test_sampled_extremes_calibrate_as_the_exact_ones_on_resnet20_cifar10():
    from xnnq.data import cifar10, data_root, normalize
    from xnnq.models.cifar_resnet import resnet20_cifar10

    x, _ = cifar10("test", limit=500)
    batches = list(normalize(x).split(100))
    m = resnet20_cifar10(data_root() / "weights" / "resnet20_cifar10jpg.pt")
    for method in ("mse", "entropy"):
        assert_same_state(
            calibrated_state(m, batches, method, False), calibrated_state(m, batches, method, True)
        )


def test_method_max_takes_the_exact_extremes():
    """``max`` covers every value, also one its sample misses."""
    x = torch.zeros(4, 3, 64, 64)
    x.view(-1)[100] = 5.0  # outside a 16-element sample (the first run)
    with pytest.warns(RuntimeWarning, match=r"`conv2d` \(conv2d: weight\)"):  # a bare conv traces as F.conv2d
        q = observe(QuantCalibrateModule(nn.Conv2d(3, 4, 1), x[:1], method="max", sample_size=16), [x])
    assert q.quantizers()["input_1_q"].clip_values()[1] == 8.0


def test_nan_the_samples_miss_is_caught_by_bias_correction():
    """A NaN outside every histogram's sample still reaches a bias-corrected layer's input mean: ``eval()`` raises
    naming that layer, and the module stays calibrating."""
    x = torch.randn(4, 3, 64, 64)
    x.view(-1)[100] = float("nan")  # outside the first run, the only one a 16-element sample takes
    q = QuantCalibrateModule(nn.Sequential(nn.Conv2d(3, 4, 1)), x[:1], sample_size=16)
    with torch.no_grad():
        q(x)
    with pytest.raises(FloatingPointError, match=r"^0: its calibration input held NaN or Inf"):
        q.eval()
    assert q.calibrating


def test_calibration_folds_each_layer_once_and_again_after_an_in_place_change():
    """The calibration forward reuses a layer's folded weights while weight, bias and BatchNorm are unchanged,
    and folds again after an in-place update of any of them (or a new storage, as ``.to()`` gives)."""
    m = toy()
    q = QuantCalibrateModule(m, torch.randn(1, 3, 8, 8)).train()
    x = torch.randn(4, 3, 8, 8)
    mod = q.module
    layers = [m for m in mod.modules() if hasattr(m, "forget_float_weight_bias")]

    def fresh():  # every layer folded anew
        for layer in layers:
            layer.forget_float_weight_bias()
        return q(x)

    def sgd_step():  # an optimizer's in-place update
        body2 = mod.get_submodule("body2")
        body2.weight.grad = torch.full_like(body2.weight, 0.05)
        torch.optim.SGD([body2.weight], lr=1.0).step()

    with torch.no_grad():
        before = q(x)
        assert torch.allclose(before, m(x), atol=1e-5)  # the float model
        body1, bn1 = mod.get_submodule("body1"), mod.get_submodule("bn1")
        w_first = body1.float_weight_bias(bn1)[0]
        assert body1.float_weight_bias(bn1)[0] is w_first  # kept, not folded again
        for edit in (
            lambda: body1.weight.mul_(1.5),
            lambda: bn1.running_var.mul_(2.0),
            lambda: bn1.bias.add_(0.3),
            lambda: mod.get_submodule("stem").bias.sub_(0.1),
            lambda: setattr(body1.weight, "data", body1.weight.data.clone() * 0.5),  # another storage
            lambda: mod.load_state_dict(
                {k: v * 1.1 if k == "body1.weight" else v for k, v in mod.state_dict().items()}
            ),
            sgd_step,
        ):
            edit()
            after = q(x)
            assert not torch.equal(after, before)
            assert torch.equal(after, fresh())
            before = after


# ------------------------------------------------------------------ bias correction: shared input means
class TwoHeads(nn.Module):
    """A stem whose ReLU output two conv heads read (as a detector's box and class heads), the second head
    reading a copy when ``copy`` (so it has an input of its own), and the stem's output also returned."""

    def __init__(self, copy: bool = False):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.box = nn.Conv2d(8, 4, 3, padding=1)
        self.cls = nn.Conv2d(8, 5, 1)
        self.copy = copy

    def forward(self, x):
        f = self.relu(self.stem(x))
        return self.box(f), self.cls(f.clone() if self.copy else f), f


def test_layers_reading_one_tensor_share_its_mean_and_correct_as_with_their_own():
    """Two heads reading the stem's output share one input mean (the tensor summed once per batch, counted once
    per image); the bias corrections are bit for bit those of the same heads each reading a copy (means of
    their own); the same input tensor fed twice is counted twice."""
    torch.manual_seed(0)
    shared_model, own_model = TwoHeads(), TwoHeads(copy=True)
    own_model.load_state_dict(shared_model.state_dict())
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(4, 3, 16, 16, generator=g) for _ in range(3)] + [None]
    batches[3] = batches[2]  # the same tensor again: a new batch, counted again
    states = []
    for model in (shared_model, own_model):
        q = QuantCalibrateModule(model.eval(), batches[0][:1])
        box, cls = q.input_means["box"], q.input_means["cls"]
        assert (box is cls) is (model is shared_model)
        with torch.no_grad():
            for b in batches:
                q(b)
        assert int(box.count) == int(cls.count) == 16
        q.eval()
        states.append(q.state_dict())
    for k in ("module.box.bias_correction", "module.cls.bias_correction"):
        assert states[0][k].abs().sum() > 0
        assert torch.equal(states[0][k], states[1][k]), k


def test_a_tensor_changed_between_two_layers_that_share_its_mean_is_an_error():
    """Nothing in the graph can change the shared tensor between its readers; a forward hook that does (in place)
    gets a clear error rather than one mean for two different inputs."""
    q = QuantCalibrateModule(TwoHeads().eval(), torch.zeros(1, 3, 16, 16))
    q.module.get_submodule("box").register_forward_hook(lambda m, a, out: a[0].mul_(1.0))
    with torch.no_grad(), pytest.raises(RuntimeError, match="changed in place between two layers"):
        q(torch.randn(2, 3, 16, 16))


def test_layers_reading_a_tensor_that_a_reader_may_change_keep_their_own_means():
    """A reader that works in place (here a ReLU(inplace=True) after the shared tensor) could change it between
    the layers reading it: each layer keeps an input mean of its own."""

    class InplaceReader(TwoHeads):
        def __init__(self):
            super().__init__()
            self.after = nn.ReLU(inplace=True)

        def forward(self, x):
            f = self.stem(x)
            return self.box(f), self.cls(f), self.after(f)

    q = QuantCalibrateModule(InplaceReader().eval(), torch.zeros(1, 3, 16, 16))
    assert q.input_means["box"] is not q.input_means["cls"]
