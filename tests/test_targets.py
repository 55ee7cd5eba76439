"""Per-chip TIDL targets (xnnq/targets.py): the wrappers' numerics, the refusals and the options JSON.

Small random-init CNN (conv, depthwise conv, residual add, pool, linear) with ranges set by a few
training-mode passes. For each target the test asserts the quantizers the wrapper built, and the
compile options the export writes (format, scale type, pre-quantized switch, 16-bit lists and the
quantization-parameters file).
"""

from __future__ import annotations

import json
import warnings

import onnx
import pytest
import torch
from torch import nn

import xnnq
from xnnq.export import export_onnx
from xnnq.export.check import onnx_check
from xnnq.export.tidl_check import TIDLImportError, tidl_check
from xnnq.layers.quant_weight import QuantConv2d
from xnnq.targets import SOURCES, TARGETS, TargetError, get_target, resolve_numerics, wrapper_settings

SHAPE = (1, 3, 16, 16)
MMAV2 = ("AM62A", "AM67A", "AM68A", "AM69A")


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu2 = nn.ReLU()
        self.pw = nn.Conv2d(8, 8, 1)
        self.relu3 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)
        for b in (self.pw.bias, self.fc.bias):  # small biases: TDA4VM clips bias codes to 16 bits (a rule)
            nn.init.uniform_(b, -0.01, 0.01)

    def forward(self, x):
        y = self.relu1(self.bn1(self.conv1(x)))
        z = self.pw(self.relu2(self.bn2(self.dw(y))))
        return self.fc(torch.flatten(self.pool(self.relu3(z + y)), 1))


def observed(q):
    torch.manual_seed(0)
    q.train()
    xnnq.utils.freeze_bn(q)
    with torch.no_grad():
        for _ in range(3):
            q(torch.randn(4, *SHAPE[1:]))
    return q.eval()


def build(target=None, **kw):
    torch.manual_seed(0)
    return observed(xnnq.QuantTrainModule(Small(), torch.randn(SHAPE), target=target, **kw))


def export(q, tmp_path, name="m", allow=(), **kw):
    """Export; the small net breaks no TIDL importer rule but those in ``allow`` (then warned about)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error" if not allow else "ignore")
        res = export_onnx(q, torch.randn(SHAPE), tmp_path / f"{name}.onnx", **kw)
    assert {v.rule for v in res.violations} <= set(allow)
    return res, json.loads(res.options_path.read_text())


def layers(q):
    return {n: m for n, m in q.module.named_modules() if isinstance(m, QuantConv2d)}


# ------------------------------------------------------------------------------------------ table
def test_names_and_aliases_resolve():
    assert get_target("j721e").name == "TDA4VM" and get_target("AM68PA").name == "TDA4VM"
    assert get_target("TDA4VL").name == "AM68A" and get_target("J721S2").name == "AM68A"
    assert get_target("tda4vh").name == "AM69A" and get_target("J784S4").name == "AM69A"
    assert get_target("J722S").name == "AM67A" and get_target("am62a").name == "AM62A"
    with pytest.raises(TargetError, match=r"unknown TIDL target 'TDA5'.*TDA4VM \(J721E"):
        get_target("TDA5")


def test_every_fact_has_a_source():
    for t in TARGETS.values():
        for fact in (
            "accelerator",
            "power2_only",
            "per_channel_weights",
            "asymmetric",
            "bias_bits",
            "formats",
            "free_scale_type",
        ):
            assert t.source(fact) in SOURCES.values()
    assert TARGETS["TDA4VM"].power2_only and not TARGETS["TDA4VM"].per_channel_weights
    assert TARGETS["TDA4VM"].bias_bits == 16 and TARGETS["TDA4VM"].formats == ("tidl", "qdq")
    for name in MMAV2:
        t = TARGETS[name]
        assert (
            not t.power2_only and t.per_channel_weights and t.formats == ("qdq",) and t.free_scale_type == 4
        )
        assert t.bias_bits is None  # not documented
    assert (
        {"conv_3x3_stride3", "deconv_16bit"} <= TARGETS["AM62A"].conv_limits == TARGETS["AM67A"].conv_limits
    )
    assert not TARGETS["AM69A"].conv_limits


# ------------------------------------------------------------------------------------------ numerics
@pytest.mark.parametrize("name", ["TDA4VM", *MMAV2])
def test_wrapper_trains_with_the_target_numerics(name):
    q = xnnq.QuantTrainModule(Small(), torch.randn(SHAPE), target=name)
    want = wrapper_settings(name)
    assert q.target == name
    assert all(p.power2 == want["power2_activation_range"] for p in q.quantizers().values())
    for m in layers(q).values():
        assert m.power2 == want["power2_weight_range"]
        assert m.per_channel == (want["per_channel_q"] == "all")
    c = xnnq.QuantCalibrateModule(Small(), torch.randn(SHAPE), target=name)
    assert all(p.power2 == want["power2_activation_range"] for p in c.quantizers().values())


def test_without_a_target_nothing_changes():
    assert resolve_numerics(None) == {
        "per_channel_q": False,
        "power2_weight_range": True,
        "power2_activation_range": True,
        "target": None,
    }
    q = xnnq.QuantTrainModule(Small(), torch.randn(SHAPE), per_channel_q="depthwise")
    assert q.target is None and layers(q)["dw"].per_channel and not layers(q)["conv1"].per_channel


def test_explicit_settings_win_where_the_target_allows_them():
    q = xnnq.QuantTrainModule(
        Small(), torch.randn(SHAPE), target="AM69A", power2_activation_range=True, per_channel_q=False
    )
    assert all(p.power2 for p in q.quantizers().values())
    assert not any(m.per_channel for m in layers(q).values()) and not any(
        m.power2 for m in layers(q).values()
    )


@pytest.mark.parametrize(
    "kw,match",
    [
        (
            {"per_channel_q": "all"},
            (
                r"TDA4VM: per_channel_q='all' asks for per-channel weight scales; TDA4VM quantizes "
                r"weights per tensor \[TexasInstruments/edgeai-modeloptimization"
            ),
        ),
        ({"per_channel_q": "depthwise"}, r"per-channel option for depthwise layers"),
        (
            {"power2_activation_range": False},
            (
                r"power2_activation_range=False asks for non-power-of-2 scales; TDA4VM "
                r"\(MMAv1\) quantizes with power-of-2 scales only"
            ),
        ),
    ],
)
def test_tda4vm_refuses_numerics_it_cannot_run(kw, match):
    with pytest.raises(TargetError, match=match):
        xnnq.QuantTrainModule(Small(), torch.randn(SHAPE), target="TDA4VM", **kw)
    with pytest.raises(TargetError, match=match):
        xnnq.QuantCalibrateModule(Small(), torch.randn(SHAPE), target="TDA4VM", **kw)


def test_export_refuses_a_wrapper_the_target_cannot_run(tmp_path):
    q = build("AM69A")  # per-channel, non-power-of-2
    with pytest.raises(
        TargetError,
        match=r"cannot run on TDA4VM as built:.*non-power-of-2 scales \(input_q, "
        r".*per-channel weight scales \(conv1, dw, pw",
    ):
        export_onnx(q, torch.randn(SHAPE), tmp_path / "x.onnx", target="TDA4VM")
    assert not (tmp_path / "x.onnx").exists()
    legacy = build(per_channel_q="depthwise")
    with pytest.raises(TargetError, match=r"1 layer\(s\) have per-channel weight scales \(dw\)"):
        export_onnx(legacy, torch.randn(SHAPE), tmp_path / "x.onnx", target="J721E")
    with pytest.raises(
        TargetError, match=r"format='tidl' .* is documented for J721E/TDA4VM only.*use format='qdq'"
    ):
        export_onnx(q, torch.randn(SHAPE), tmp_path / "x.onnx", format="tidl")


def test_export_target_defaults_to_the_wrappers(tmp_path):
    res, opts = export(build("AM68A"), tmp_path)
    assert res.target == opts["target"] == "AM68A" and opts["format"] == "qdq" and res.flow == "qdq"
    res, opts = export(build(), tmp_path, name="legacy")
    assert res.target is None and "target" not in opts and opts["format"] == "tidl"
    assert opts["runtime_options"] == {
        "tensor_bits": 8,
        "accuracy_level": 0,
        "advanced_options:quantization_scale_type": 1,
    }


# ------------------------------------------------------------------------------------------ options JSON
@pytest.mark.parametrize(
    "name,fmt,kw,expected",
    [
        (
            "TDA4VM",
            "tidl",
            {},
            {"tensor_bits": 8, "accuracy_level": 0, "advanced_options:quantization_scale_type": 1},
        ),
        (
            "TDA4VM",
            "qdq",
            {},
            {
                "tensor_bits": 8,
                "accuracy_level": 0,
                "advanced_options:quantization_scale_type": 1,
                "advanced_options:prequantized_model": 1,
            },
        ),
        *[
            (
                n,
                None,
                {},
                {
                    "tensor_bits": 8,
                    "accuracy_level": 0,
                    "advanced_options:quantization_scale_type": 4,
                    "advanced_options:prequantized_model": 1,
                },
            )
            for n in MMAV2
        ],
        (
            "AM69A",
            None,
            {"per_channel_q": False, "power2_weight_range": True, "power2_activation_range": True},
            {
                "tensor_bits": 8,
                "accuracy_level": 0,
                "advanced_options:quantization_scale_type": 1,
                "advanced_options:prequantized_model": 1,
            },
        ),
        (
            "AM62A",
            None,
            {"per_channel_q": "all", "power2_weight_range": True, "power2_activation_range": True},
            {
                "tensor_bits": 8,
                "accuracy_level": 0,
                "advanced_options:quantization_scale_type": 4,
                "advanced_options:prequantized_model": 1,
            },
        ),
    ],
)
def test_options_json_per_target(tmp_path, name, fmt, kw, expected):
    q = build(name, **kw)
    res, opts = export(q, tmp_path, format=fmt)
    assert opts["runtime_options"] == expected
    assert opts["target"] == name and opts["flow"] == (fmt or "qdq")
    assert opts["format"] == (fmt or "qdq")
    if opts["format"] == "qdq":
        ops = {n.op_type for n in res.model.graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
        r = onnx_check(res.path, q, [torch.randn(4, *SHAPE[1:])])
        # power-of-2 numerics: onnxruntime equals the simulation bit for bit; free scales: within 1 output LSB
        assert (
            r.frac_exact == 1.0
            if expected["advanced_options:quantization_scale_type"] == 1
            else r.max_lsb_diff <= 1.0 + 1e-4
        )


@pytest.mark.parametrize("name,scale_type", [("TDA4VM", 1), ("AM69A", 0)])
def test_options_json_16bit_in_the_qdq_flow(tmp_path, name, scale_type):
    q = build(name, bitwidth_overrides={"conv1": 16})
    # per-channel weights with the quantization-parameters file: undocumented by TI, warned about
    per_channel_warning = {"options.quant_params_per_channel"} if name == "AM69A" else set()
    res, opts = export(q, tmp_path, format="qdq", allow=per_channel_warning)
    assert {v.rule for v in res.violations} == per_channel_warning
    ro = opts["runtime_options"]
    assert res.flow == opts["flow"] == "quant_params"
    assert ro["advanced_options:quant_params_proto_path"] == "m.quant_params.prototxt" == opts["quant_params"]
    assert (
        "advanced_options:prequantized_model" not in ro
        and ro["accuracy_level"] == 0
        and ro["tensor_bits"] == 8
    )
    assert ro["advanced_options:quantization_scale_type"] == scale_type
    assert ro["advanced_options:output_feature_16bit_names_list"] == "relu1"
    assert ro["advanced_options:params_16bit_names_list"] == "relu1"
    assert (tmp_path / "m.quant_params.prototxt").is_file()
    assert not {"QuantizeLinear", "DequantizeLinear"} & {
        n.op_type for n in res.model.graph.node
    }  # float graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in res.reference_model.graph.node}


def test_tidl_options_are_validated(tmp_path):
    q = build("TDA4VM")
    _res, opts = export(q, tmp_path, tidl_options={"advanced_options:add_data_convert_ops": 3})
    assert opts["runtime_options"]["advanced_options:add_data_convert_ops"] == 3
    with pytest.raises(ValueError, match="unknown TIDL compile option 'advanced_options:add_data_convert'"):
        export_onnx(
            q, torch.randn(SHAPE), tmp_path / "y.onnx", tidl_options={"advanced_options:add_data_convert": 3}
        )
    with pytest.raises(ValueError, match="'accuracy_level' is derived from the exported model"):
        export_onnx(q, torch.randn(SHAPE), tmp_path / "y.onnx", tidl_options={"accuracy_level": 1})


# ------------------------------------------------------------------------------------------ importer rules at export
class ChannelPad(nn.Module):
    """ResNet option-A shortcut: a stride-2 slice and zero channels padded on."""

    def __init__(self, relu: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU() if relu else nn.Identity()

    def forward(self, x):
        y = self.relu(self.conv(x))
        return nn.functional.pad(y[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2))


def test_export_checks_and_fixes_importer_rules(tmp_path):
    # zero channels on an unsigned (ReLU) tensor: fixed exactly (identity 1x1 Conv), nothing left to report
    q = observed(xnnq.QuantTrainModule(ChannelPad(), torch.randn(SHAPE)))
    res = export_onnx(q, torch.randn(SHAPE), tmp_path / "f.onnx", target="TDA4VM", strict=True)
    assert res.violations == [] and "Pad" not in res.op_counts()
    assert any("zero channels -> 1x1 Conv" in f for f in res.fixes)
    # on a signed tensor the channel Pad stays (no exact fix under TIDL's weight rule) and is reported
    q = observed(xnnq.QuantTrainModule(ChannelPad(relu=False), torch.randn(SHAPE)))
    with pytest.warns(
        UserWarning, match=r"\[error\] .*Pad.*Pad.axes: pads \[0, 2, 0, 0, 0, 2, 0, 0\] pad axis \[1\]"
    ):
        res = export_onnx(q, torch.randn(SHAPE), tmp_path / "p.onnx", target="TDA4VM")
    assert [v.rule for v in res.violations] == ["Pad.axes"]
    assert any("Slice with step 2 on H and W -> MaxPool kernel 1x1 stride 2" in f for f in res.fixes)
    assert "Slice" not in res.op_counts() and res.op_counts()["MaxPool"] == 1
    assert onnx_check(res.path, res.module, [torch.randn(2, *SHAPE[1:])]).max_abs_diff < 1e-5
    opts = json.loads(res.options_path.read_text())
    assert opts["violations"][0]["rule"] == "Pad.axes" and opts["fixes"] == res.fixes
    with pytest.raises(TIDLImportError, match=r"(?s)1 TIDL importer rule\(s\) broken:.*Pad.axes"):
        export_onnx(q, torch.randn(SHAPE), tmp_path / "strict.onnx", target="TDA4VM", strict=True)
    assert not (tmp_path / "strict.onnx").exists()
    assert xnnq.utils.tidl_check(res.path, "TDA4VM")[0].rule == "Pad.axes"  # reads the JSON beside the file


# ------------------------------------------------------------------------------------------ SiLU
def _silu_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.SiLU(),
        nn.Conv2d(8, 8, 1),
        nn.SiLU(inplace=True),
        nn.Conv2d(8, 4, 1),
    )


@pytest.mark.parametrize(
    "target, silu, split",
    [
        ("TDA4VM", "fused", False),
        ("TDA4VM", "sigmoid_mul", True),
        ("AM69A", "sigmoid_mul", True),
        (None, "sigmoid_mul", True),
    ],
)
def test_a_silu_can_be_quantized_as_tidl_runs_it(tmp_path, target, silu, split):
    """ONNX has no SiLU op up to opset 19 (TIDL's): TIDL runs x·σ(x) as a Sigmoid layer and a Mul layer.
    With silu="sigmoid_mul" σ(x) gets a quantizer of its own, so the QDQ file gives TIDL a scale for every
    layer; fused (the default) the Sigmoid output reaches the Mul in float (warned)."""
    torch.manual_seed(0)
    q = xnnq.QuantTrainModule(_silu_net(), torch.randn(SHAPE), target=target, silu=silu).train()
    opt = torch.optim.SGD(q.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        q(torch.randn(4, *SHAPE[1:])).pow(2).mean().backward()
        opt.step()
    q.eval()
    sig_quantized = [a for a in q.plan.acts if a.reason == "Sigmoid"]
    assert len(sig_quantized) == (2 if split else 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = export_onnx(q, torch.randn(SHAPE), tmp_path / "m.onnx", format="qdq", target=target)
    model = onnx.load(str(res.path))
    assert sum(n.op_type == "Sigmoid" for n in model.graph.node) == 2
    floats = [v for v in tidl_check(res.path, target or "TDA4VM") if v.rule == "QDQ.float_output"]
    assert len(floats) == (0 if split else 2)
    lsb = onnx_check(res.path, q, [torch.randn(4, *SHAPE[1:])]).max_lsb_diff
    # power-of-2 scales: bit-exact in onnxruntime; AM69A's free scales: its float requantization, 1 step at most
    assert lsb == 0.0 if q.config.power2_activation_range else lsb <= 1.0 + 1e-4


def test_silu_setting_is_checked():
    with pytest.raises(ValueError, match="silu must be one of 'fused', 'sigmoid_mul'"):
        xnnq.QuantTrainModule(_silu_net(), torch.randn(SHAPE), silu="split")


def test_a_silu_state_dict_loads_only_into_a_wrapper_that_quantizes_silus_the_same_way():
    torch.manual_seed(0)
    q = xnnq.QuantTrainModule(_silu_net(), torch.randn(SHAPE), target="TDA4VM", silu="sigmoid_mul").train()
    q(torch.randn(4, *SHAPE[1:]))
    t = xnnq.QuantTestModule(_silu_net(), torch.randn(SHAPE), silu="sigmoid_mul")
    t.load_state_dict(q.state_dict())  # the same quantizers without the target: loads
    with pytest.raises(
        ValueError, match=r"saved with its SiLUs quantized as x \* sigmoid\(x\).*silu='sigmoid_mul'"
    ):
        xnnq.QuantTestModule(_silu_net(), torch.randn(SHAPE)).load_state_dict(q.state_dict())
    # a model without SiLUs loads either way
    relu = xnnq.QuantTrainModule(Small(), torch.randn(SHAPE), silu="sigmoid_mul")
    xnnq.QuantTestModule(Small(), torch.randn(SHAPE)).load_state_dict(relu.state_dict())


def test_learned_ranges_for_a_free_scale_chip_name_the_settings_to_pass():
    with pytest.raises(
        ValueError, match="AM69A's default numerics use free scales: pass power2_activation_range"
    ):
        xnnq.QuantTrainModule(Small(), torch.randn(SHAPE), target="AM69A", range_learning="tqt")
    q = xnnq.QuantTrainModule(
        Small(),
        torch.randn(SHAPE),
        target="AM69A",
        range_learning="tqt",
        power2_activation_range=True,
        power2_weight_range=True,
    )
    assert q.range_parameters()
