"""xnnq.export_onnx: the "tidl" float graph and the QDQ graph, TIDL emulation and onnx_check.

Random-init models with ranges set by a few training-mode forward passes; small inputs. Each test
asserts the graph structure (node-type counts: one Clip or one Q/DQ pair per quantized activation, no
shape arithmetic) and the numbers (onnxruntime vs PyTorch).
"""

from __future__ import annotations

import contextlib
import json
import warnings

import numpy as np
import onnx
import pytest
import torch
import torchvision
from onnx import TensorProto, numpy_helper
from torch import nn

import xnnq
from xnnq.export import TIDL_ONNX_OPS, export_onnx
from xnnq.export.check import OnnxRunner, onnx_check
from xnnq.export.emulate import requantization_error, tidl_emulation
from xnnq.models.cifar_resnet import resnet20

from conftest import conv_act_conv, is_pow2, observe

SHAPE_OPS = {
    "Shape",
    "Gather",
    "Concat",
    "ConstantOfShape",
    "Cast",
    "Constant",
    "Identity",
    "Dropout",
    "BatchNormalization",
    "Unsqueeze",
    "Range",
}


def observed(qmodel, shape, passes: int = 2, batch: int = 2):
    """Set ranges with a few training-mode passes (BN frozen so the folded weights are the eval ones)."""
    torch.manual_seed(0)
    return observe(qmodel, (torch.randn(batch, *shape[1:]) for _ in range(passes)), bn_frozen=True)


def quant_clips(qmodel):
    """(name, lo, hi, scale, qmin, qmax) of every enabled quantizer."""
    out = []
    for name, m in qmodel.quantizers().items():
        if m.quant_enabled:
            s, qmin, qmax = m.qparams()
            out.append((name, *m.clip_values(), float(s), qmin, qmax))
    return out


def counts(model: onnx.ModelProto) -> dict[str, int]:
    c: dict[str, int] = {}
    for n in model.graph.node:
        c[n.op_type] = c.get(n.op_type, 0) + 1
    return c


@contextlib.contextmanager
def onnx_rounding(qmodel, mode: str = "half_even"):
    """The simulation rounded with ``mode`` inside the block (default: as onnxruntime computes a QDQ file,
    half to even); the default rounding (half to even) restored after it."""
    xnnq.layers.set_rounding(qmodel, mode)
    try:
        yield qmodel
    finally:
        xnnq.layers.set_rounding(qmodel, "half_even")


def check_tidl(res, qmodel, x: torch.Tensor, *, weight_layers: int):
    model = onnx.load(str(res.path))
    onnx.checker.check_model(model, full_check=True)
    c = counts(model)
    assert c.get("Clip", 0) == len(quant_clips(qmodel)), c  # exactly one Clip per quantized activation
    assert c.get("Conv", 0) + c.get("Gemm", 0) == weight_layers
    assert not SHAPE_OPS & set(c), c
    assert not {n.op_type for n in model.graph.node} - TIDL_ONNX_OPS
    for v in list(model.graph.input) + list(model.graph.output):  # static shapes
        assert all(d.HasField("dim_value") for d in v.type.tensor_type.shape.dim)
    opts = json.loads(res.options_path.read_text())
    ro = opts["runtime_options"]
    assert ro["accuracy_level"] == 0 and ro["advanced_options:quantization_scale_type"] == 1
    assert ro["tensor_bits"] == 8 and "advanced_options:prequantized_model" not in ro
    ranges = {(lo, hi) for _, lo, hi, *_ in quant_clips(qmodel)}
    assert {tuple(v) for v in opts["activation_ranges"].values()} == ranges
    for tensor, (lo, hi) in opts["activation_ranges"].items():  # every range is a power of 2 (or ReLU6's 6)
        assert is_pow2(np.array([max(-lo, hi)])) or hi == 6.0, (tensor, lo, hi)
    # weights already on their grid: TIDL's re-quantization changes nothing, bit for bit
    err = requantization_error(res.path)
    assert len(err) == weight_layers and max(err.values()) == 0.0
    # onnxruntime computes what the PyTorch export graph (eval, Clips) computes
    r = onnx_check(res.path, res.module, [x])
    assert r.max_abs_diff <= 1e-4, r
    return model


def check_qdq(res, qmodel, x: torch.Tensor, *, weight_layers: int, exact: bool = True):
    model = onnx.load(str(res.path))
    onnx.checker.check_model(model, full_check=True)
    c = counts(model)
    clips = quant_clips(qmodel)
    inner = sum(
        1 for _, lo, hi, s, qmin, qmax in clips if hi < qmax * s or lo > qmin * s
    )  # ReLU6 cap inside the grid
    assert c.get("QuantizeLinear", 0) == len(clips), c  # one Q/DQ pair per quantized activation
    assert c.get("Clip", 0) == inner, c  # a Clip only where it cuts inside the grid
    inits = {t.name: t for t in model.graph.initializer}
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    w_dq = [
        n
        for n in dq
        if n.input[0] in inits and inits[n.input[0]].data_type in (TensorProto.INT8, TensorProto.INT16)
    ]
    b_dq = [n for n in dq if n.input[0] in inits and inits[n.input[0]].data_type == TensorProto.INT32]
    assert len(w_dq) == weight_layers and len(b_dq) <= weight_layers
    assert len(dq) == len(clips) + len(w_dq) + len(b_dq)
    assert not SHAPE_OPS & set(c), c
    for n in dq + [n for n in model.graph.node if n.op_type == "QuantizeLinear"]:
        assert is_pow2(numpy_helper.to_array(inits[n.input[1]])), n.name
        if len(n.input) > 2:
            assert not numpy_helper.to_array(inits[n.input[2]]).any(), n.name
    # uint8 after ReLU (Clip min 0), int8 otherwise
    opts = json.loads(res.options_path.read_text())
    quantizer_of = {t: q for q, t in opts["quantizers"].items()}
    spot = {name: (lo, qmin) for name, lo, _, _, qmin, _ in clips}
    for n in model.graph.node:
        if n.op_type == "QuantizeLinear":
            lo, qmin = spot[quantizer_of[n.name[: -len("_QuantizeLinear")]]]
            bits = (
                16
                if abs(qmin) > 128 or opts["activation_bits"][n.name[: -len("_QuantizeLinear")]] == 16
                else 8
            )
            want = {
                (8, True): TensorProto.UINT8,
                (8, False): TensorProto.INT8,
                (16, True): TensorProto.UINT16,
                (16, False): TensorProto.INT16,
            }[(bits, lo == 0)]
            assert inits[n.input[2]].data_type == want, n.name
    assert opts["runtime_options"]["advanced_options:prequantized_model"] == 1
    with onnx_rounding(qmodel):  # simulation, onnxruntime and the integer reference, all half to even
        r = onnx_check(res.path, qmodel, [x])
    if exact:
        assert r.max_abs_diff == 0.0, r
    with onnx_rounding(qmodel, "tidl"):  # TIDL's rounding: the simulation and the integer reference
        tidl = onnx_check(res.path, qmodel, [x])
    if r.reference_error is None:
        assert r.ref_frac_exact_vs_ort == r.ref_frac_exact_vs_sim == 1.0, r
        assert tidl.rounding == "tidl" and tidl.ref_frac_exact_vs_sim == 1.0, tidl
    else:  # ops without an integer implementation (LR-ASPP's HardSwish / Sigmoid)
        assert "no integer implementation" in r.reference_error
    return model, r


# ---------------------------------------------------------------------------------------- ResNet-20
@pytest.fixture(scope="module")
def r20():
    return observed(
        xnnq.QuantTrainModule(resnet20(), torch.randn(1, 3, 32, 32)), (1, 3, 32, 32), passes=3, batch=8
    )


def test_resnet20_tidl(r20, tmp_path):
    res = export_onnx(r20, torch.randn(1, 3, 32, 32), tmp_path / "r20.onnx")
    assert res.options_path.name == "r20.tidl.json"
    model = check_tidl(res, r20, torch.randn(4, 3, 32, 32), weight_layers=20)
    c = counts(model)
    assert c == {
        "Clip": 31,
        "Conv": 19,
        "Add": 9,
        "Slice": 2,
        "Pad": 2,
        "AveragePool": 1,
        "Reshape": 1,
        "Gemm": 1,
    }
    # every Clip output is named after its quantizer; the network input is clipped first
    names = {n.output[0] for n in model.graph.node if n.op_type == "Clip"}
    assert "input_q" in names and "layer1.0.relu" in names
    assert model.graph.node[0].op_type == "Clip" and model.graph.node[0].input[0] == "input"


def test_resnet20_qdq_matches_simulation_bit_for_bit(r20, tmp_path):
    res = export_onnx(r20, torch.randn(1, 3, 32, 32), tmp_path / "r20_qdq.onnx", format="qdq")
    x = torch.randn(16, 3, 32, 32)
    _, r = check_qdq(res, r20, x, weight_layers=20)
    assert r.top1_agreement == 1.0 and r.frac_within_1_lsb == 1.0 and r.max_lsb_diff == 0.0
    # the same without onnxruntime's QDQ fusion (every node as written)
    with onnx_rounding(r20):
        assert onnx_check(res.path, r20, [x], optimize=False).max_abs_diff == 0.0


def test_tidl_emulation_computes_the_simulation(r20, tmp_path):
    res = export_onnx(r20, torch.randn(2, 3, 32, 32), tmp_path / "r20.onnx")
    emu = tidl_emulation(res.path)
    x = torch.randn(6, 3, 32, 32)  # 3 runs of the static batch of 2
    with onnx_rounding(r20):  # the emulation runs in onnxruntime: half to even
        assert torch.equal(OnnxRunner(emu)(x), r20(x))


def test_mixed_16bit_and_per_channel(tmp_path):
    q = observed(
        xnnq.QuantTrainModule(
            resnet20(),
            torch.randn(1, 3, 32, 32),
            per_channel_q="all",
            bitwidth_overrides={"first": 16, "last": 16},
        ),
        (1, 3, 32, 32),
    )
    res = export_onnx(q, torch.randn(1, 3, 32, 32), tmp_path / "m.onnx")
    opts = json.loads(res.options_path.read_text())
    ro = opts["runtime_options"]
    feat = ro["advanced_options:output_feature_16bit_names_list"].split(",")
    params = ro["advanced_options:params_16bit_names_list"].split(",")
    sixteen = {opts["quantizers"][n] for n, m in q.quantizers().items() if m.bits == 16}
    assert set(feat) == sixteen == {"relu", "output"}  # conv1's ReLU; linear_q produces the graph output
    assert params == ["relu", "output"]  # conv1 → its ReLU Clip; linear → the graph output
    assert max(requantization_error(res.path).values()) == 0.0
    x = torch.randn(4, 3, 32, 32)
    with onnx_rounding(q):
        assert torch.equal(
            OnnxRunner(tidl_emulation(res.path))(x), q(x)
        )  # the emulation reads the 16-bit lists
    qres = export_onnx(q, torch.randn(1, 3, 32, 32), tmp_path / "m_qdq.onnx", format="qdq")
    model, _ = check_qdq(qres, q, x, weight_layers=20)
    assert model.opset_import[0].version >= 21
    inits = {t.name: t for t in model.graph.initializer}
    assert inits["conv1.weight_quantized"].data_type == TensorProto.INT16
    assert inits["layer1.0.conv1.weight_quantized"].data_type == TensorProto.INT8
    assert inits["relu_zero_point"].data_type == TensorProto.UINT16
    assert numpy_helper.to_array(inits["layer1.0.conv1.weight_scale"]).shape == (16,)  # per output channel


def test_calibrated_and_test_module_export(r20, tmp_path):
    from xnnq.calibrate import QuantCalibrateModule

    torch.manual_seed(0)
    cal = QuantCalibrateModule(resnet20().eval(), torch.randn(1, 3, 32, 32), weight_clipping="mse").train()
    with torch.no_grad():
        cal(torch.randn(8, 3, 32, 32))
    cal.eval()
    res = export_onnx(cal, torch.randn(1, 3, 32, 32), tmp_path / "cal.onnx")
    assert max(requantization_error(res.path).values()) == 0.0  # clipped weight ranges stay on their grid
    check_qdq(
        export_onnx(cal, torch.randn(1, 3, 32, 32), tmp_path / "cal_qdq.onnx", format="qdq"),
        cal,
        torch.randn(4, 3, 32, 32),
        weight_layers=20,
    )
    qt = xnnq.QuantTestModule(resnet20(), torch.randn(1, 3, 32, 32))
    qt.load_state_dict(r20.state_dict())
    check_qdq(
        export_onnx(qt, torch.randn(1, 3, 32, 32), tmp_path / "qt.onnx", format="qdq"),
        r20,
        torch.randn(4, 3, 32, 32),
        weight_layers=20,
    )


# ------------------------------------------------------------------------------ torchvision models
TV = {
    "resnet18": (lambda: torchvision.models.resnet18(), 21),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(), 53),
    "lraspp": (
        lambda: torchvision.models.segmentation.lraspp_mobilenet_v3_large(
            weights=None, weights_backbone=None
        ),
        66,
    ),
}


@pytest.mark.parametrize("name", list(TV))
def test_torchvision_both_formats(name, tmp_path):
    make, layers = TV[name]
    torch.manual_seed(0)
    shape = (1, 3, 32, 32)
    q = observed(xnnq.QuantTrainModule(make().eval(), torch.randn(shape)), shape, passes=1)
    x = torch.randn(2, 3, 32, 32)
    tidl = check_tidl(
        export_onnx(q, torch.randn(shape), tmp_path / f"{name}.onnx"), q, x, weight_layers=layers
    )
    model, r = check_qdq(
        export_onnx(q, torch.randn(shape), tmp_path / f"{name}_qdq.onnx", format="qdq"),
        q,
        x,
        weight_layers=layers,
    )
    if name == "lraspp":  # interpolate: Resize with constant scales, no size arithmetic around it
        inits = {t.name for t in tidl.graph.initializer}
        resizes = [n for n in tidl.graph.node if n.op_type == "Resize"]
        assert len(resizes) == 2
        for n in resizes:
            assert len(n.input) == 3 and n.input[2] in inits  # (X, roi '', constant scales), no sizes
        assert [o.name for o in model.graph.output] == ["out"]
    else:
        assert r.top1_agreement == 1.0


class ShuffleBlock(nn.Module):
    """A ShuffleNet-style unit: grouped 1x1 conv, channel shuffle in one of its torch forms, depthwise 3x3,
    grouped 1x1 conv, residual add."""

    def __init__(self, form: str):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.g1 = nn.Sequential(nn.Conv2d(8, 8, 1, groups=2, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.shuffle = nn.ChannelShuffle(2) if form == "module" else None
        self.form = form
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8))
        self.g2 = nn.Sequential(nn.Conv2d(8, 8, 1, groups=2, bias=False), nn.BatchNorm2d(8))

    def forward(self, x):
        x = self.stem(x)
        y = self.g1(x)
        if self.form == "module":
            y = self.shuffle(y)
        elif self.form == "function":
            y = torch.nn.functional.channel_shuffle(y, 2)
        else:
            y = torch.nn.functional.native_channel_shuffle(y, 2)
        return torch.relu(x + self.g2(self.dw(y)))


@pytest.mark.parametrize("form", ["module", "function", "native"])
def test_channel_shuffle_exports_in_both_formats(form, tmp_path):
    """torch.onnx cannot export aten::channel_shuffle: the surgery puts reshape-transpose-reshape in its place
    (the same values), so a shuffle unit quantizes (no quantizer of its own: range-preserving) and exports to
    TIDL's ops, the QDQ graph bit for bit; the user's model keeps its shuffle."""
    torch.manual_seed(0)
    model = ShuffleBlock(form).eval()
    shape = (1, 3, 8, 8)
    q = observed(xnnq.QuantTrainModule(model, torch.randn(shape)), shape)
    assert not any("shuffle" in name for name in q.quantizers()), list(q.quantizers())
    if form == "module":
        assert type(model.shuffle) is nn.ChannelShuffle
        assert "shuffle: torch.nn.ChannelShuffle -> xnnq.layers.ChannelShuffle" in q.surgery_report()
    x = torch.randn(2, 3, 8, 8)
    tidl = check_tidl(export_onnx(q, torch.randn(shape), tmp_path / "s.onnx"), q, x, weight_layers=4)
    assert {"Reshape", "Transpose"} <= set(counts(tidl))
    model_qdq, r = check_qdq(
        export_onnx(q, torch.randn(shape), tmp_path / "s_qdq.onnx", format="qdq"), q, x, weight_layers=4
    )
    assert {"Reshape", "Transpose"} <= set(counts(model_qdq))


class ChannelsLastMLP(nn.Module):
    """A ConvNeXt-style block: permute to channels-last, (LayerNorm,) Linear, ReLU, Linear on the 4-D tensor,
    permute back, residual add; a Linear head."""

    def __init__(self, norm: bool, bias: bool = True):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.norm = nn.LayerNorm(16) if norm else nn.Identity()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16, bias=bias)
        self.head = nn.Linear(16, 10, bias=bias)

    def forward(self, x):
        x = self.stem(x)
        y = self.fc2(torch.relu(self.fc1(self.norm(x.permute(0, 2, 3, 1)))))
        return self.head((x + y.permute(0, 3, 1, 2)).mean((2, 3)))


@pytest.mark.parametrize(
    "norm, bias", [(False, True), (True, True), (False, False)], ids=["plain", "layernorm", "no-bias"]
)
def test_linear_on_a_4d_tensor_exports_as_gemm_on_rows(norm, bias, tmp_path):
    """torch.onnx writes a Linear on a tensor of more than two dimensions, or one without bias, as MatMul with
    a transposed copy of the weight; the export writes Gemm on the weight initializer itself (between two
    Reshapes; with a zero bias): both formats export, the QDQ graph bit for bit, and the integer reference
    runs it at another batch size than the export's."""
    torch.manual_seed(0)
    shape = (1, 3, 8, 8)
    q = observed(xnnq.QuantTrainModule(ChannelsLastMLP(norm, bias).eval(), torch.randn(shape)), shape)
    x = torch.randn(2, 3, 8, 8)
    tidl = check_tidl(export_onnx(q, torch.randn(shape), tmp_path / "m.onnx"), q, x, weight_layers=4)
    model, r = check_qdq(
        export_onnx(q, torch.randn(shape), tmp_path / "m_qdq.onnx", format="qdq"), q, x, weight_layers=4
    )
    for m in (tidl, model):
        gemm_weights = {n.input[1] for n in m.graph.node if n.op_type == "Gemm"}
        assert gemm_weights == {"fc1.weight", "fc2.weight", "head.weight"}
        assert "MatMul" not in counts(m)
    assert (r.reference_error is None) == (not norm)  # LayerNorm has no integer implementation


class TinyViT(nn.Module):
    """Patch embedding, one nn.TransformerEncoderLayer (batch first), mean over tokens, Linear head."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 4, stride=4)
        self.encoder = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.encoder(self.patch(x).flatten(2).transpose(1, 2)).mean(1))


def test_transformer_layers_export_outside_torchs_fused_inference_path(tmp_path):
    """In eval mode torch runs nn.TransformerEncoderLayer / nn.MultiheadAttention through fused kernels that
    torch.onnx cannot export; the export switches them off for its trace (and restores the setting): the layer
    (a leaf, float inside) exports in ONNX ops, the QDQ graph computes the simulation, and the integer
    reference says which layer it cannot run."""
    torch.manual_seed(0)
    shape = (1, 3, 16, 16)
    with pytest.warns(RuntimeWarning, match="`encoder` \\(TransformerEncoderLayer"):  # its weights stay float
        q = observed(xnnq.QuantTrainModule(TinyViT().eval(), torch.randn(shape)), shape)
    x = torch.randn(2, *shape[1:])
    before = torch.backends.mha.get_fastpath_enabled()
    res = export_onnx(q, torch.randn(shape), tmp_path / "vit.onnx")
    assert torch.backends.mha.get_fastpath_enabled() == before
    assert {"Softmax", "MatMul", "LayerNormalization"} <= set(counts(onnx.load(str(res.path))))
    assert onnx_check(res.path, res.module, [x]).max_abs_diff <= 1e-4
    res = export_onnx(q, torch.randn(shape), tmp_path / "vit_qdq.onnx", format="qdq")
    with onnx_rounding(q):
        r = onnx_check(res.path, q, [x])
    assert r.max_abs_diff == 0.0, r
    assert "float tensor" in r.reference_error and "encoder" in r.reference_error


# ----------------------------------------------------------------------------------------- errors
def test_warns_on_ops_outside_tidl_allow_list(tmp_path):
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Softplus(), nn.Conv2d(4, 4, 1))
    q = observed(xnnq.QuantTrainModule(m, torch.randn(1, 3, 8, 8)), (1, 3, 8, 8))
    with pytest.warns(UserWarning, match=r"1 node\(s\) use ops TIDL does not accelerate.*Softplus"):
        res = export_onnx(q, torch.randn(1, 3, 8, 8), tmp_path / "sp.onnx")
    assert [op for _, op in res.unsupported] == ["Softplus"]


def test_clear_errors(tmp_path):
    with pytest.raises(TypeError, match="xnnq wrapper"):
        export_onnx(resnet20(), torch.randn(1, 3, 32, 32), tmp_path / "x.onnx")
    fresh = xnnq.QuantTrainModule(resnet20(), torch.randn(1, 3, 32, 32)).eval()
    with pytest.raises(RuntimeError, match="input_q: no activation range"):
        export_onnx(fresh, torch.randn(1, 3, 32, 32), tmp_path / "x.onnx")
    with pytest.raises(ValueError, match="format"):
        export_onnx(fresh, torch.randn(1, 3, 32, 32), tmp_path / "x.onnx", format="tflite")


def test_an_adaptive_pool_onnx_cannot_express_is_named_with_the_fix(tmp_path):
    """torchvision's VGG at 32x32: its AdaptiveAvgPool2d((7, 7)) gets a 1x1 map, which ONNX cannot pool to 7x7;
    the export names the module and the fix instead of torch.onnx's internal error, and exports at 224x224."""
    torch.manual_seed(0)
    small = (1, 3, 32, 32)
    q = observed(
        xnnq.QuantTrainModule(torchvision.models.vgg11(num_classes=10).eval(), torch.randn(small)), small
    )
    with pytest.raises(
        ValueError, match=r"`avgpool` \(AdaptiveAvgPool2d\) pools a 1x1 input to 7x7.*input size"
    ):
        export_onnx(q, torch.randn(small), tmp_path / "vgg.onnx")
    assert not q.module.get_submodule("avgpool")._forward_hooks  # the export's check left nothing behind
    tiny = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
    q = observed(xnnq.QuantTrainModule(tiny.eval(), torch.randn(1, 3, 8, 8)), (1, 3, 8, 8))
    assert export_onnx(q, torch.randn(1, 3, 8, 8), tmp_path / "tiny.onnx").path.exists()  # 8 -> 2 divides
    with pytest.raises(ValueError, match=r"`2` \(AdaptiveAvgPool2d\) pools a 7x7 input to 2x2"):
        export_onnx(q, torch.randn(1, 3, 7, 7), tmp_path / "tiny7.onnx")


def test_export_leaves_the_model_unchanged(r20, tmp_path):
    r20.train()
    before = {k: v.clone() for k, v in r20.state_dict().items() if isinstance(v, torch.Tensor)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no allow-list warning for ResNet-20
        export_onnx(r20, torch.randn(1, 3, 32, 32), tmp_path / "u.onnx")
    assert r20.training
    after = r20.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    r20.eval()


class MishFn(nn.Module):
    def forward(self, x):
        return nn.functional.mish(x)


@pytest.mark.parametrize("fmt", ["tidl", "qdq"])
def test_mish_exports_as_the_mish_op_tidl_runs(fmt, tmp_path):
    """torch exports Mish as x·Tanh(Softplus(x)), and Softplus is not a TIDL op: the export writes ONNX's
    Mish (opset 18, TIDL's Mish layer) instead, computing the same (onnxruntime vs the simulation)."""
    torch.manual_seed(0)
    q = observed(
        xnnq.QuantTrainModule(conv_act_conv(nn.Mish(), MishFn()), torch.randn(1, 3, 8, 8)), (1, 3, 8, 8)
    ).eval()
    res = export_onnx(q, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx", format=fmt, target="TDA4VM")
    c = counts(onnx.load(str(res.path)))
    assert c.get("Mish") == 2 and not {"Softplus", "Tanh"} & set(c), c
    assert res.violations == []
    r = onnx_check(res.path, q, [torch.randn(4, 3, 8, 8)])
    assert r.max_lsb_diff == 0.0 if fmt == "qdq" else r.max_lsb_diff <= 3.0


def _dead_channel_net() -> nn.Sequential:
    """A conv whose second channel has near-zero folded weights (BatchNorm gamma 1e-9) and a bias of 1.5."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)
    )
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([1.0, 1e-9, 1.0, 1.0]))
        model[1].bias.copy_(torch.tensor([0.1, 1.5, 0.1, 0.1]))
    return model.eval()


def _calibrated16(model: nn.Module, x: torch.Tensor, **kw) -> nn.Module:
    q = xnnq.QuantCalibrateModule(
        model, x, bitwidth_weights=16, bitwidth_activations=16, per_channel_q="all", **kw
    )
    with torch.no_grad():
        q.train()(torch.randn(8, *x.shape[1:]))
    return q.eval()


def test_a_weight_scale_is_raised_until_its_bias_fits_int32(tmp_path):
    """Per channel at 16 bits the dead channel's own weight scale (from its ~1e-9 weights) would make the bias
    step input scale x weight scale too small for its bias in int32: the scale is raised to the smallest power
    of 2 that holds it (onnxruntime's quantizer does the same), so the bias survives; the other channels keep
    the scales their weights give, and onnxruntime computes the simulation bit for bit."""
    torch.manual_seed(0)
    model, x = _dead_channel_net(), torch.randn(1, 3, 8, 8)
    q = _calibrated16(model, x)
    spot = next(w for w in q.plan.weights if w.name == "0")
    layer, bn, in_q = (q.module.get_submodule(n) for n in (spot.name, spot.bn, spot.input_quant))
    with torch.no_grad():
        w, b = layer.folded_weight_bias(bn)
        own = layer.quantize_weight(w)[1]  # the scales of the weights alone
        wq, bq, ws = layer.quantized_weight_bias_scale(bn, in_q)
    s_in, limit = in_q.qparams()[0], 2**31 - 1
    assert float(b[1] / (s_in * own[1])) > limit  # would saturate
    # raised to the smallest power of 2 that holds the bias: half of it would not
    assert ws[1] > own[1] and float(b[1] / (s_in * ws[1])) <= limit < float(b[1] / (s_in * ws[1] / 2))
    assert torch.equal(ws[[0, 2, 3]], own[[0, 2, 3]])  # the others unchanged
    assert float((bq[1] - b[1]).abs()) <= float(s_in * ws[1])  # the bias kept
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        res = export_onnx(q, x, tmp_path / "m.onnx", format="qdq")
    assert not [r for r in rec if "int32 bias saturates" in str(r.message)]
    assert onnx_check(res.path, q, [torch.randn(2, 3, 8, 8)]).max_lsb_diff == 0.0


def test_a_saturated_int32_bias_is_warned_by_layer(tmp_path):
    """Learned weight thresholds (TQT) keep their scale: there the dead channel's bias saturates, and the export
    names the layer (the simulation clips the bias the same way)."""
    torch.manual_seed(0)
    model, x = _dead_channel_net(), torch.randn(1, 3, 8, 8)
    q = xnnq.QuantTrainModule(
        model, x, bitwidth_weights=16, bitwidth_activations=16, per_channel_q="all", range_learning="tqt"
    ).train()
    with torch.no_grad():
        q(torch.randn(8, 3, 8, 8))
    xnnq.utils.freeze_bn(q)
    q.eval()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        export_onnx(q, x, tmp_path / "m.onnx", format="qdq")
    msgs = [str(r.message) for r in rec if "int32 bias saturates" in str(r.message)]
    assert msgs and "0 (1 of 4 channels)" in msgs[0] and "per_channel_q=False" in msgs[0], msgs
