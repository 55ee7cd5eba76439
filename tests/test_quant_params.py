"""TIDL's quantization-parameters file for 16-bit layers in the pre-quantized flow (xnnq.export.quant_params).

The file is parsed back with protobuf's text format against TI's documented message layout; the test
asserts that it names every tensor of the exported graph, that each range is the simulation's (largest
code × step of the quantizer of that tensor), the 16-bit layers, the weights and biases of the file, and
that tidl_check reads it.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import xnnq
from xnnq.export import export_onnx, tidl_check
from xnnq.export.check import onnx_check
from xnnq.export.onnx_graph import gelu_patterns
from xnnq.export.quant_params import message_class, read_quant_params, validate_quant_params

from conftest import conv_act_conv

SHAPE = (1, 3, 16, 16)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 8 * 8, 4)

    def forward(self, x):
        y = self.relu1(self.bn1(self.conv1(x)))
        y = self.pool(self.relu2(self.conv2(y) + y))
        return self.fc(torch.flatten(y, 1))


def exported(tmp_path, target, **kw):
    torch.manual_seed(0)
    q = xnnq.QuantTrainModule(
        Net(), torch.randn(SHAPE), target=target, bitwidth_overrides={"conv1": 16}, **kw
    )
    q.train()
    xnnq.utils.freeze_bn(q)
    with torch.no_grad():
        for _ in range(3):
            q(torch.randn(4, *SHAPE[1:]))
    q.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TDA4VM: the random-init classifier's bias exceeds 16 bits (warned)
        res = export_onnx(q, torch.randn(SHAPE), tmp_path / "m.onnx", format="qdq", target=target)
    return q, res


@pytest.mark.parametrize("target", ["TDA4VM", "AM69A"])
def test_file_names_every_tensor_with_the_simulation_ranges(tmp_path, target):
    q, res = exported(tmp_path, target)
    assert res.flow == "quant_params" and res.quant_params_path == tmp_path / "m.quant_params.prototxt"
    msg = read_quant_params(res.quant_params_path)
    assert validate_quant_params(msg) == []
    model = onnx.load(str(res.path))
    graph_tensors = {i.name for i in model.graph.input} | {o for n in model.graph.node for o in n.output}
    by_name = {lm.layer_name: lm for lm in msg.layers}
    assert set(by_name) == graph_tensors and msg.num_layers == len(msg.layers) == len(graph_tensors)
    assert msg.quant_type == 1 and msg.calib_type == (2 if target == "AM69A" else 1)

    # every quantizer of the simulation: its Clip tensor carries its range, exactly
    opts = json.loads(res.options_path.read_text())
    quantized = 0
    for qname, tensor in opts["quantizers"].items():
        pact = q.module.get_submodule(qname)
        scale, qmin, qmax = pact.qparams()
        hi = np.float32(qmax * float(scale))
        lo = np.float32(-hi if qmin < 0 else 0.0)
        out = by_name[tensor].outputs[0]
        assert (np.float32(out.min), np.float32(out.max)) == (lo, hi), qname
        assert out.scale[0] == pytest.approx(1.0 / float(scale), rel=1e-6)
        assert by_name[tensor].bit_depth == pact.bits
        quantized += 1
    assert quantized == len(opts["quantizers"]) >= 6
    # the other tensors carry the range of the quantizer they feed or follow
    ranges = {(lm.outputs[0].min, lm.outputs[0].max) for lm in msg.layers}
    assert ranges <= {
        (by_name[t].outputs[0].min, by_name[t].outputs[0].max) for t in opts["quantizers"].values()
    }
    conv1_out = next(n.output[0] for n in model.graph.node if n.op_type == "Conv")
    assert (
        by_name[conv1_out].bit_depth == 16
        and by_name[conv1_out].outputs[0].max == by_name["relu1"].outputs[0].max
    )
    assert sum(lm.bit_depth == 16 for lm in msg.layers) == 2  # conv1 and its ReLU's quantizer

    # weights and biases are the exported (folded, on-grid) ones
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    for n in convs:
        lm = by_name[n.output[0]]
        wt = inits[n.input[1]]
        assert (lm.weights[0].min, lm.weights[0].max) == (np.float32(wt.min()), np.float32(wt.max()))
        assert lm.weights[0].size == (wt.shape[0] if target == "AM69A" else 1)
        if len(n.input) > 2:
            b = inits[n.input[2]]
            assert lm.bias[0].size == b.size == len(lm.bias[0].value)
            np.testing.assert_array_equal(np.asarray(lm.bias[0].value, np.float32), b)
    # what tidl_check finds in the written files is what the export found: per-channel weights with the file
    # (AM69A, undocumented: warned) and the random-init classifier's bias beyond 16 bits (TDA4VM: warned)
    # (TDA4VM; the export finds it in the QDQ form, where bias codes are explicit)
    found = {v.rule for v in tidl_check(res.path, target)}
    assert found <= {v.rule for v in res.violations} <= found | {"Bias.width"}
    assert found <= {"options.quant_params_per_channel"}
    assert ("options.quant_params_per_channel" in found) == (target == "AM69A")


def test_reference_model_runs_the_mixed_simulation_in_onnxruntime(tmp_path):
    q, res = exported(tmp_path, "TDA4VM")
    r = onnx_check(res.reference_model, q, [torch.randn(4, *SHAPE[1:])])
    assert r.frac_exact == 1.0  # int16 QDQ for onnxruntime, power-of-2: bit for bit


def test_tidl_check_reads_the_file(tmp_path):
    _, res = exported(tmp_path, "AM69A")
    rules = {v.rule for v in tidl_check(res.path, "AM69A")}
    assert (
        "options.quant_params_per_channel" in rules
    )  # per-channel weights with the file: undocumented, warned
    assert not {r for r in rules if r.startswith("options.") and r != "options.quant_params_per_channel"}
    text = res.quant_params_path.read_text()
    first = text.index("layers {")
    res.quant_params_path.write_text(text[:first].replace("num_layers", "num_layers: 1 #") + text[first:])
    problems = {v.message for v in tidl_check(res.path, "AM69A") if v.rule == "options.quant_params_content"}
    assert any("num_layers is 1 but" in p for p in problems)
    res.quant_params_path.unlink()
    missing = [v for v in tidl_check(res.path, "AM69A") if v.rule == "options.quant_params_file"]
    assert missing and "TIDL would write its own (write mode) and calibrate" in missing[0].message


def test_bit_depth_style_and_validation(tmp_path):
    torch.manual_seed(0)
    q = xnnq.QuantTrainModule(Net(), torch.randn(SHAPE), target="TDA4VM", bitwidth_overrides={"conv1": 16})
    q.train()
    with torch.no_grad():
        q(torch.randn(4, *SHAPE[1:]))
    q.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = export_onnx(
            q,
            torch.randn(SHAPE),
            tmp_path / "b.onnx",
            format="qdq",
            quant_params={"bit_depth": "bytes", "layer_names": "node"},
        )
    msg = read_quant_params(res.quant_params_path)
    assert {lm.bit_depth for lm in msg.layers} == {1, 2}
    names = {n.name for n in res.model.graph.node} | {i.name for i in res.model.graph.input}
    assert {lm.layer_name for lm in msg.layers} == names
    with pytest.raises(ValueError, match="quant_params: unknown keys"):
        export_onnx(
            q, torch.randn(SHAPE), tmp_path / "c.onnx", format="qdq", quant_params={"bitdepth": "bits"}
        )

    bad = message_class()()
    bad.num_layers = 2
    layer = bad.layers.add(layer_name="conv", layer_type="TIDL_ConvolutionLayer")
    layer.outputs.add(min=0.0, max=4.0)
    layer.bias.add(min=-1.0, max=1.0, size=3, value=[0.5])
    layer.weights.add()  # min/max left at ±FLT_MAX
    problems = validate_quant_params(bad)
    assert any("num_layers is 2 but 1" in p for p in problems)
    assert any("bias size 3 but 1 values" in p for p in problems)
    assert any("weights min/max not set" in p for p in problems)


def test_a_file_in_the_documented_format_parses():
    text = """num_layers: 1
quant_type: SYMMETRIC
calib_type: PERTENSOR
layers {
  layer_name: "head"
  layer_type: "TIDL_ConvolutionLayer"
  bit_depth: 8
  outputs { min: -2 max: 2 size: 1 element_type: 1 scale: 64 zero_point: 0 }
  weights { min: -0.5 max: 0.25 size: 1 element_type: 1 scale: 256 zero_point: 0 }
  bias { min: -0.1 max: 0.2 size: 2 element_type: 5 value: -0.1 value: 0.2 }
}
"""
    from google.protobuf import text_format

    msg = text_format.Parse(text, message_class()())
    assert validate_quant_params(msg) == [] and msg.layers[0].bias[0].value == [-0.1, 0.2]
    with pytest.raises(text_format.ParseError):
        text_format.Parse(text.replace("outputs", "outpu"), message_class()())


class Tokens(nn.Module):
    """A transformer-style head: linear layers on a 3-d token tensor (exported as Reshape → Gemm → Reshape),
    LayerNorm and an erf GELU (exported as Div, Erf, Add, Mul, Mul at TIDL's opset)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(8, 16)
        self.ln = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        t = torch.relu(self.conv(x)).flatten(2).transpose(1, 2)
        return self.fc2(nn.functional.gelu(self.ln(self.fc1(t)))).mean(1)


def _mixed_export(tmp_path, net: nn.Module, silu: str = "fused", **kw):
    torch.manual_seed(0)
    q = xnnq.QuantTrainModule(
        net, torch.randn(SHAPE), target="TDA4VM", bitwidth_overrides={"first": 16}, silu=silu
    )
    q.train()
    with torch.no_grad():
        for _ in range(3):
            q(torch.randn(4, *SHAPE[1:]))
    q.eval()
    res = export_onnx(q, torch.randn(SHAPE), tmp_path / "m.onnx", format="qdq", target="TDA4VM", **kw)
    assert res.flow == "quant_params"
    msg = read_quant_params(res.quant_params_path)
    assert validate_quant_params(msg) == []
    return q, res, onnx.load(str(res.path)), {lm.layer_name: lm for lm in msg.layers}


def test_gelu_and_reshaped_gemm_outputs_get_their_quantizers_ranges(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-init Gemm biases exceed 16 bits on TDA4VM (warned)
        q, res, model, layers = _mixed_export(tmp_path, Tokens())
    # the erf GELU is one TIDL layer (its Batchnorm layer): every node of it is named with the range of the
    # quantizer after it, and tidl_check does not flag its Erf as an Erf alone
    (gelu,) = gelu_patterns(model.graph)
    assert [n.op_type for n in gelu.nodes] == ["Div", "Erf", "Add", "Mul", "Mul"]
    (clip,) = [n for n in model.graph.node if gelu.output in n.input]
    assert clip.op_type == "Clip"
    expected = (layers[clip.output[0]].outputs[0].min, layers[clip.output[0]].outputs[0].max)
    for n in gelu.nodes:
        lm = layers[n.output[0]]
        assert lm.layer_type == "TIDL_BatchNormLayer" and (lm.outputs[0].min, lm.outputs[0].max) == expected
    assert not [
        v for v in tidl_check(res.path, "TDA4VM") if v.rule in ("graph.fused_only", "graph.unsupported_op")
    ]
    # each Gemm on the tokens is read by its quantizer through a Reshape: the Gemm's output has its range
    for g in (n for n in model.graph.node if n.op_type == "Gemm"):
        (reshape,) = [n for n in model.graph.node if g.output[0] in n.input]
        (clip,) = [n for n in model.graph.node if reshape.output[0] in n.input]
        assert reshape.op_type == "Reshape" and clip.op_type == "Clip"
        assert layers[g.output[0]].outputs[0].max == layers[clip.output[0]].outputs[0].max > 0


def test_an_erf_alone_is_still_flagged(tmp_path):
    class ErfAlone(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return torch.erf(self.conv(x))

    path = tmp_path / "erf.onnx"
    torch.onnx.export(ErfAlone().eval(), torch.randn(SHAPE), path, opset_version=17, dynamo=False)
    assert [v.rule for v in tidl_check(path, "TDA4VM") if v.node.startswith("/Erf")] == ["graph.fused_only"]


def test_a_sigmoid_left_in_float_gets_its_natural_range_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match=r"Sigmoid_output_0 \(1 tensor\(s\)\): the simulation leaves"):
        q, res, model, layers = _mixed_export(tmp_path, conv_act_conv(nn.SiLU()))
    (sig,) = [n for n in model.graph.node if n.op_type == "Sigmoid"]
    lm = layers[sig.output[0]]
    # the input of the SiLU is the 16-bit first conv's output: the Sigmoid takes its bitwidth, unsigned
    assert lm.bit_depth == 16 and lm.outputs[0].min == 0.0 and lm.outputs[0].max == (2**16 - 1) / 2**16
    with pytest.raises(ValueError, match=r"Sigmoid_output_0 \(Sigmoid\).*'unquantized': 'natural'"):
        _mixed_export(tmp_path, conv_act_conv(nn.SiLU()), quant_params={"unquantized": "error"})
    with pytest.raises(ValueError, match="'unquantized' must be one of"):
        _mixed_export(tmp_path, conv_act_conv(nn.SiLU()), quant_params={"unquantized": "zero"})


def test_a_float_output_in_the_8bit_qdq_flow_is_warned_by_name(tmp_path):
    torch.manual_seed(0)
    q = xnnq.QuantTrainModule(conv_act_conv(nn.SiLU()), torch.randn(SHAPE), target="TDA4VM").train()
    with torch.no_grad():
        q(torch.randn(4, *SHAPE[1:]))
    q.eval()
    with pytest.warns(UserWarning, match="QDQ.float_output"):
        res = export_onnx(q, torch.randn(SHAPE), tmp_path / "m.onnx", format="qdq", target="TDA4VM")
    assert res.flow == "qdq"
    found = [(v.op, v.rule, v.severity) for v in res.violations]
    assert found == [("Sigmoid", "QDQ.float_output", "warning")]
    assert [v.rule for v in tidl_check(res.path, "TDA4VM")] == ["QDQ.float_output"]


def test_an_argmax_output_is_written_as_class_indices(tmp_path):
    """A segmentation export that ends in ArgMax, with a 16-bit layer: the ArgMax output (class indices, not
    quantized by the simulation) is in the file as unsigned integers, step 1."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q, res, model, layers = _mixed_export(tmp_path, conv_act_conv(nn.SiLU()), argmax=True)
    (am,) = [n for n in model.graph.node if n.op_type == "ArgMax"]
    lm = layers[am.output[0]]
    assert lm.layer_type == "TIDL_ArgOpLayer" and lm.bit_depth == 8
    assert (lm.outputs[0].min, lm.outputs[0].max) == (0.0, 255.0) and list(lm.outputs[0].scale) == [1.0]
