"""Transposed convolutions (segmentation decoders): QuantConvTranspose2d folds its BatchNorm and quantizes its
weights along their output-channel axis (1), both exports carry them, and the integer reference runs them."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, numpy_helper
from torch import nn

import xnnq
from xnnq.calibrate import QuantCalibrateModule
from xnnq.export import export_onnx
from xnnq.export.check import OnnxRunner, onnx_check
from xnnq.export.emulate import tidl_emulation
from xnnq.export.reference_ops import QTensor, conv_transpose
from xnnq.layers import QuantConvTranspose2d
from xnnq.layers.fake_quant import quant_bounds

from conftest import is_pow2


class Decoder(nn.Module):
    """Encoder, a 4x4/2 transposed conv + BN + ReLU back up, a 2x2/2 one with bias, a skip concatenation."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(c, 2 * c, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * c), nn.ReLU())
        self.up = nn.ConvTranspose2d(2 * c, c, 4, stride=2, padding=1, bias=False)
        self.up_bn = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.up2 = nn.ConvTranspose2d(c, c, 2, stride=2)
        self.head = nn.Conv2d(2 * c, 5, 1)

    def forward(self, x):
        e = self.enc(x)
        u = self.relu(self.up_bn(self.up(self.down(e))))
        return self.head(torch.cat([e, self.up2(self.pool(u))], 1))


def _decoder() -> nn.Module:
    torch.manual_seed(0)
    m = Decoder()
    with torch.no_grad():  # BatchNorm statistics of their own, so folding is not the identity
        for bn in (m.enc[1], m.down[1], m.up_bn):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    return m


def _trained(per_channel: bool, **kw) -> tuple[nn.Module, torch.Tensor]:
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    q = xnnq.QuantTrainModule(_decoder(), x[:1], per_channel_q="all" if per_channel else False, **kw)
    opt = torch.optim.SGD(q.parameters(), lr=0.01)
    for _ in range(4):
        loss = q(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return q.eval(), x


def test_plan_folds_the_batchnorm_and_leaves_the_user_model_alone():
    m = _decoder()
    before = copy.deepcopy(m.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "weights stay float" warning: every kernel is quantized
        q = xnnq.QuantTrainModule(m, torch.randn(1, 3, 16, 16))
    spots = {w.name: w for w in q.plan.weights}
    assert spots["up"].kind == "ConvTranspose2d" and spots["up"].bn == "up_bn"
    assert spots["up2"].kind == "ConvTranspose2d" and spots["up2"].bn is None
    assert isinstance(q.module.get_submodule("up"), QuantConvTranspose2d)
    assert isinstance(m.up, nn.ConvTranspose2d) and not isinstance(m.up, QuantConvTranspose2d)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


@pytest.mark.parametrize("bn_training", [False, True])
def test_unquantized_layer_computes_the_float_deconv_and_batchnorm(bn_training):
    torch.manual_seed(0)
    deconv, bn = nn.ConvTranspose2d(6, 4, 4, 2, 1, output_padding=1, dilation=2), nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 2)
    q = QuantConvTranspose2d.from_float(deconv, name="up")
    q.quant_enabled = False
    bn_ref = copy.deepcopy(bn)
    bn.train(bn_training), bn_ref.train(bn_training)
    x = torch.randn(3, 6, 5, 7)
    y, ref = q(x, bn), bn_ref(deconv(x))
    assert y.shape == ref.shape == (3, 4, 14, 18)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    if bn_training:  # the batch statistics updated as the float BatchNorm updates them
        torch.testing.assert_close(bn.running_var, bn_ref.running_var)


@pytest.mark.parametrize("per_channel", [False, True])
def test_weights_are_quantized_per_output_channel_on_axis_1(per_channel):
    torch.manual_seed(0)
    deconv = nn.ConvTranspose2d(6, 4, 3, 2, 1)
    with torch.no_grad():
        deconv.weight[:, 2].mul_(8.0)  # one output channel with a range of its own
    q = QuantConvTranspose2d.from_float(deconv, per_channel=per_channel, constrain_weights=False)
    wq, scale = q.quantize_weight(deconv.weight)
    qmin, qmax = quant_bounds(8, True)
    if per_channel:
        assert scale.shape == (4,)
        m = deconv.weight.detach().abs().amax(dim=(0, 2, 3))
        assert torch.equal(scale, 2.0 ** torch.ceil(torch.log2(m)) / 2**7)
        assert scale[2] == 8 * scale[0]
        codes = wq / scale.view(1, -1, 1, 1)
    else:
        assert scale.dim() == 0 and scale == 2.0 ** torch.ceil(torch.log2(deconv.weight.abs().max())) / 2**7
        codes = wq / scale
    assert torch.equal(codes, codes.round()) and codes.min() >= qmin and codes.max() <= qmax
    assert q.bias_correction.shape == (4,)


@pytest.mark.parametrize("per_channel", [False, True])
def test_qdq_export_is_bit_exact_in_onnxruntime_and_the_integer_reference(per_channel, tmp_path):
    q, x = _trained(per_channel)
    target = "AM69A" if per_channel else "TDA4VM"  # TDA4VM: per-tensor weights (docs/README_tidl.md)
    res = export_onnx(q, x[:1], tmp_path / "dec.onnx", format="qdq", target=target)
    assert res.target == target and not res.violations, res.violations
    model = onnx.load(str(res.path))
    inits = {t.name: t for t in model.graph.initializer}
    deconvs = [n for n in model.graph.node if n.op_type == "ConvTranspose"]
    assert len(deconvs) == 2
    for n in deconvs:  # the weight: int8 codes [in, out, k, k] and a DequantizeLinear along axis 1
        dq = next(
            d for d in model.graph.node if d.op_type == "DequantizeLinear" and d.output[0] == n.input[1]
        )
        codes = inits[dq.input[0]]
        assert codes.data_type == TensorProto.INT8
        assert is_pow2(numpy_helper.to_array(inits[dq.input[1]]))
        axis = next((a.i for a in dq.attribute if a.name == "axis"), None)
        if per_channel:
            assert axis == 1 and numpy_helper.to_array(inits[dq.input[1]]).shape == (codes.dims[1],)
    c = onnx_check(res.path, q, [x], integer_reference=True)
    assert c.max_abs_diff == 0.0 and c.frac_exact == 1.0
    assert c.ref_frac_exact_vs_ort == 1.0


def test_tidl_export_clip_graph_and_emulation_compute_the_simulation(tmp_path):
    q, x = _trained(False)
    res = export_onnx(q, x[:1], tmp_path / "dec.onnx", format="tidl", target="TDA4VM")
    assert not res.violations, res.violations
    assert sum(n.op_type == "ConvTranspose" for n in res.model.graph.node) == 2
    xnnq.layers.set_rounding(q, "half_even")  # the emulation runs in onnxruntime: half to even
    assert torch.equal(OnnxRunner(tidl_emulation(res.path))(x), q(x))


def test_tidl_check_flags_a_deconvolution_tidl_does_not_take(tmp_path):
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.up = nn.ConvTranspose2d(4, 4, 3, stride=1, padding=1)  # 3x3 stride 1: not in TIDL's list

        def forward(self, x):
            return self.up(torch.relu(self.conv(x)))

    x = torch.randn(2, 3, 8, 8)
    q = xnnq.QuantTrainModule(Odd(), x[:1])
    q.train()
    with torch.no_grad():
        q(x)
    with pytest.warns(UserWarning, match="ConvTranspose.kernel_stride"):
        res = export_onnx(q.eval(), x[:1], tmp_path / "odd.onnx", target="TDA4VM")
    assert any(v.rule == "ConvTranspose.kernel_stride" and "up" in v.node for v in res.violations), (
        res.violations
    )


def test_calibration_corrects_the_deconv_bias_by_its_own_weight_error(tmp_path):
    torch.manual_seed(0)
    m = _decoder()
    xs = [torch.randn(8, 3, 16, 16) for _ in range(3)]
    cal = QuantCalibrateModule(m, xs[0][:1], method="max")
    layer, bn = cal.module.get_submodule("up"), cal.module.get_submodule("up_bn")
    seen = []  # the deconv's float inputs during calibration
    hook = layer.register_forward_pre_hook(lambda mod, a: seen.append(a[0].detach().clone()))
    with torch.no_grad():
        for x in xs:
            cal(x)
    hook.remove()
    cal.eval()
    # the shift of the deconv's output mean that its weight quantization causes, measured on those inputs
    corr = layer.bias_correction.clone()
    layer.bias_correction.zero_()
    w, _ = layer.folded_weight_bias(bn)
    wq = layer.quantize_weight(w)[0]
    layer.bias_correction.copy_(corr)
    x_all = torch.cat(seen).double()
    shift = F.conv_transpose2d(x_all, (wq - w).double(), None, 2, 1).mean(dim=(0, 2, 3))
    assert corr.abs().max() > 0
    torch.testing.assert_close(corr.double(), shift, rtol=1e-4, atol=1e-7)
    res = export_onnx(cal, xs[0][:1], tmp_path / "cal.onnx", format="qdq")
    assert onnx_check(res.path, cal, [xs[0]]).max_abs_diff == 0.0


def test_learned_ranges_per_channel_on_the_deconv(tmp_path):
    q, x = _trained(True, range_learning="tqt", range_init_batches=2)
    layer = q.module.get_submodule("up")
    assert layer.learned_range is not None and layer.learned_range.log2_t.shape == (8,)
    assert layer.learned_range.log2_t.grad is not None
    res = export_onnx(q, x[:1], tmp_path / "tqt.onnx", format="qdq")
    assert onnx_check(res.path, q, [x]).max_abs_diff == 0.0


def test_state_dict_round_trip(tmp_path):
    q, x = _trained(True)
    fresh = xnnq.QuantTrainModule(_decoder(), x[:1], per_channel_q="all")
    fresh.load_state_dict(q.state_dict())
    fresh.eval()
    assert torch.equal(fresh(x), q(x))


def test_grouped_or_sized_deconvs_stay_float_and_are_named():
    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.up = nn.ConvTranspose2d(4, 4, 2, stride=2, groups=2)
            self.sized = nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1)

        def forward(self, x):
            y = self.up(self.conv(x))
            return self.sized(y, output_size=[2 * y.shape[2], 2 * y.shape[3]])

    with pytest.warns(RuntimeWarning, match=r"`up` \(ConvTranspose2d: weight\).*`sized` \(ConvTranspose2d"):
        q = xnnq.QuantTrainModule(Grouped(), torch.randn(1, 3, 8, 8))
    assert [w.name for w in q.plan.weights] == ["conv"]
    assert q(torch.randn(2, 3, 8, 8)).shape == (2, 4, 32, 32)


@pytest.mark.parametrize(
    "k, s, p, op, d",
    [(4, 2, 1, 0, 1), (2, 2, 0, 0, 1), (3, 2, 1, 1, 1), (3, 1, 1, 0, 2), (2, 2, 2, 0, 1), (3, 3, 0, 2, 1)],
)
def test_integer_reference_conv_transpose_equals_torch(k, s, p, op, d):
    g = torch.Generator().manual_seed(k * 100 + s * 10 + p)
    x = torch.randint(-128, 128, (2, 5, 6, 7), generator=g)
    w = torch.randint(-127, 128, (5, 3, k, k), generator=g)
    b = torch.randint(-1000, 1000, (3,), generator=g)
    ref = F.conv_transpose2d(x.double(), w.double(), b.double(), s, p, op, 1, d)
    attrs = {"strides": [s, s], "pads": [p, p, p, p], "output_padding": [op, op], "dilations": [d, d]}
    e_w = np.array([-7, -6, -5], dtype=np.int64).reshape(1, 3, 1, 1)  # per-output-channel weight exponents
    got = conv_transpose(
        QTensor(x.numpy().astype(np.int64), -3),
        QTensor(w.numpy().astype(np.int64), e_w),
        QTensor(b.numpy().astype(np.int64), (-3 + e_w).reshape(3)),
        attrs,
        "t",
    )
    scaled = F.conv_transpose2d(
        x.double() * 2.0**-3,
        w.double() * torch.tensor([2.0**-7, 2.0**-6, 2.0**-5]).view(1, 3, 1, 1),
        None,
        s,
        p,
        op,
        1,
        d,
    ) + (b.double() * 2.0**-3 * torch.tensor([2.0**-7, 2.0**-6, 2.0**-5])).view(1, 3, 1, 1)
    assert got.num.shape == tuple(ref.shape)
    assert np.array_equal(got.value(), scaled.numpy())
