"""Bad input: every case raises a clear error (what, where, how to fix) and leaves the user's model as it was.

Core cases first (wrapping, range tracking, evaluation, weights files), then the export cases
(``xnnq.export_onnx``) and the calibration cases (``xnnq.QuantCalibrateModule``).
"""

from __future__ import annotations

import ast
import copy
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import xnnq
from xnnq.layers import PACT2, freeze_quant_range
from xnnq.utils.io import load_state_dict_file

from conftest import quantizer_ranges

REPO = Path(__file__).resolve().parents[1]
DUMMY = torch.randn(1, 3, 8, 8)


class Net(nn.Module):
    """Conv-BN-ReLU, a residual add, an ``exp`` (to overflow on demand), pool, linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = y + self.conv2(y)
        y = torch.exp(y * 0.1)
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return x
        return -x


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.conv(x))


def net() -> Net:
    torch.manual_seed(0)
    return Net()


def snapshot(model: nn.Module) -> dict:
    return {
        "state": copy.deepcopy(model.state_dict()),
        "repr": repr(model),
        "training": model.training,
        "modes": [m.training for m in model.modules()],
        "types": [type(m) for m in model.modules()],
    }


def assert_unmodified(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["repr"] == before["repr"] and after["types"] == before["types"], (
        "the model's modules changed"
    )
    assert after["modes"] == before["modes"], "the model's train/eval mode changed"
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        same = torch.equal(after["state"][k], v) if isinstance(v, torch.Tensor) else after["state"][k] == v
        assert same, f"the model's {k} changed"


def trained(q: xnnq.QuantTrainModule, n: int = 2) -> xnnq.QuantTrainModule:
    q.train()
    with torch.no_grad():
        for i in range(n):
            q(torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(i)))
    return q


def test_wrapping_and_training_never_touch_the_float_model():
    """The wrapper works on a deep copy: QAT steps, freezing and eval leave the user's model as it was."""
    m = net()
    m.train()
    before = snapshot(m)
    q = xnnq.QuantTrainModule(m, DUMMY)
    opt = torch.optim.SGD(q.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        q(torch.randn(4, 3, 8, 8)).sum().backward()
        opt.step()
    xnnq.utils.freeze_bn(q)
    freeze_quant_range(q)
    q.eval()
    q(DUMMY)
    assert_unmodified(m, before)
    assert not any(p is qp for p in m.parameters() for qp in q.parameters())


# ------------------------------------------------------------------------------------- dummy_input
@pytest.mark.parametrize(
    "dummy",
    [None, [1, 2, 3], 3.0, torch.randint(0, 255, (1, 3, 8, 8)), (), "x"],
    ids=["None", "list", "float", "int-tensor", "empty", "str"],
)
def test_dummy_input_of_the_wrong_type(dummy):
    m = net()
    before = snapshot(m)
    with pytest.raises(TypeError, match=r"dummy_input .*(float tensor|shaped like).*"):
        xnnq.QuantTrainModule(m, dummy)
    assert_unmodified(m, before)


def test_numpy_dummy_input_names_the_fix():
    with pytest.raises(TypeError, match=r"dummy_input must be a tensor.*got ndarray.*torch.randn"):
        xnnq.QuantTrainModule(net(), np.zeros((1, 3, 8, 8), np.float32))


@pytest.mark.parametrize(
    "dummy",
    [torch.randn(1, 1, 8, 8), torch.randn(3, 8, 8), torch.randn(1, 3, 8)],
    ids=["channels", "no-batch", "rank"],
)
def test_dummy_input_of_the_wrong_shape(dummy):
    m = net()
    m.train()
    before = snapshot(m)
    with pytest.raises(xnnq.CaptureError) as e:
        xnnq.QuantTrainModule(m, dummy)
    msg = str(e.value)
    assert "conv1" in msg  # where
    assert "dummy_input must have the shape" in msg  # how to fix
    assert_unmodified(m, before)


def test_too_many_dummy_inputs():
    m = net()
    before = snapshot(m)
    with pytest.raises(xnnq.CaptureError, match=r"forward takes 1 input\(s\) but dummy_input gives 2"):
        xnnq.QuantTrainModule(m, (DUMMY, DUMMY))
    assert_unmodified(m, before)


# ---------------------------------------------------------------------------------------- tracing
def test_untraceable_control_flow_names_module_line_and_fix():
    m = Branchy()
    before = snapshot(m)
    with pytest.raises(xnnq.CaptureError) as e:
        xnnq.QuantTrainModule(m, DUMMY)
    msg = str(e.value)
    assert "module `gate` (Gate)" in msg
    assert "test_bad_input.py" in msg and "if x.sum() > 0" in msg  # the user's line
    assert "leaf_modules=['gate']" in msg  # the fix
    assert_unmodified(m, before)
    q = xnnq.QuantTrainModule(m, DUMMY, leaf_modules=["gate"])  # the fix works
    assert torch.isfinite(trained(q)(DUMMY)).all()


def test_unknown_leaf_module_name():
    with pytest.raises(ValueError, match=r"leaf_modules names \['nope'\]"):
        xnnq.QuantTrainModule(Branchy(), DUMMY, leaf_modules=["nope"])


# --------------------------------------------------------------------------------- wrapped twice
@pytest.mark.parametrize("outer", [xnnq.QuantTrainModule, xnnq.QuantTestModule])
def test_model_wrapped_twice(outer):
    q = xnnq.QuantTrainModule(net(), DUMMY)
    before = snapshot(q)
    for inner in (q, q.module):
        with pytest.raises(TypeError, match=r"already wrapped/quantized by xnnq.*wrap the float model once"):
            outer(inner, DUMMY)
    assert_unmodified(q, before)


# --------------------------------------------------------------------------------------- bitwidth
@pytest.mark.parametrize(
    "kwargs, where",
    [
        ({"bitwidth_weights": 4}, "bitwidth_weights"),
        ({"bitwidth_activations": 32}, "bitwidth_activations"),
        ({"bitwidth_overrides": {"first": 12}}, "bitwidth_overrides['first']"),
        ({"bitwidth_overrides": {"conv2": 7}}, "bitwidth_overrides['conv2']"),
    ],
)
def test_bitwidth_other_than_8_or_16(kwargs, where):
    m = net()
    before = snapshot(m)
    with pytest.raises(ValueError) as e:
        xnnq.QuantTrainModule(m, DUMMY, **kwargs)
    assert where in str(e.value) and "TIDL quantizes to 8 or 16 bits" in str(e.value)
    assert_unmodified(m, before)


def test_bitwidth_on_layers_directly():
    with pytest.raises(ValueError, match=r"act3: bitwidth 4 is not supported"):
        PACT2(bits=4, name="act3")
    with pytest.raises(ValueError, match=r"c1: bitwidth 32 is not supported"):
        xnnq.layers.QuantConv2d.from_float(nn.Conv2d(3, 3, 1), bits=32, name="c1")


def test_override_matching_no_layer_lists_the_layers():
    with pytest.raises(ValueError, match=r"'convX' matches no layer. Layers: conv1, conv2, fc"):
        xnnq.QuantTrainModule(net(), DUMMY, bitwidth_overrides={"convX": 16})


# ----------------------------------------------------------------------- NaN / Inf in range tracking
def test_nan_in_the_input_names_the_quantizer_and_keeps_ranges():
    q = trained(xnnq.QuantTrainModule(net(), DUMMY))
    before = quantizer_ranges(q)
    x = torch.randn(4, 3, 8, 8)
    x[1, 2, 3, 4] = float("nan")
    with pytest.raises(FloatingPointError) as e:
        q(x)
    assert str(e.value).startswith("input_q: the activation holds NaN or Inf; the range was not updated.")
    assert "learning rate" in str(e.value)
    assert all(
        torch.equal(before[k][0], v[0]) and torch.equal(before[k][1], v[1])
        for k, v in quantizer_ranges(q).items()
    )


def test_inf_inside_the_network_names_the_layer_and_training_goes_on():
    q = trained(xnnq.QuantTrainModule(net(), DUMMY))
    xnnq.utils.freeze_bn(q)  # BN in training mode would renormalize the large input
    before = quantizer_ranges(q)
    with pytest.raises(FloatingPointError, match=r"^exp_q: the activation holds NaN or Inf"):
        q(torch.randn(4, 3, 8, 8) * 1e4)  # finite input; exp() overflows inside the network
    after = quantizer_ranges(q)
    assert torch.equal(after["exp_q"][0], before["exp_q"][0]) and torch.equal(
        after["exp_q"][1], before["exp_q"][1]
    )
    assert all(torch.isfinite(lo) and torch.isfinite(hi) for lo, hi in after.values())  # nothing poisoned
    trained(q, 1)  # the next good batch is tracked normally (the error is not sticky)
    assert int(q.quantizers()["exp_q"].observer.num_batches) == 3
    q.eval()
    assert torch.isfinite(q(DUMMY)).all()


def test_a_nonfinite_first_batch_decides_nothing():
    """The first batch decides the signedness of a ``signed=None`` quantizer; a NaN batch must not."""
    p = PACT2(bits=8, signed=None, name="p")
    p.train()
    with pytest.raises(FloatingPointError, match="^p: "):
        p(torch.tensor([float("nan"), 1.0]))
    assert p.data_signed is None and not p.observed
    p.eval()
    with pytest.raises(RuntimeError, match="no activation range has been observed"):
        p(torch.ones(2))
    p.train()
    p(torch.tensor([-2.0, 1.0]))
    assert p.resolved_signed() is True and float(p.observer.min_val) == -2.0


# ------------------------------------------------------------------------- nothing observed yet
@pytest.mark.parametrize("wrapper", [xnnq.QuantTrainModule, xnnq.QuantTestModule])
def test_evaluating_before_any_range_was_observed(wrapper):
    q = wrapper(net(), DUMMY)
    q.eval()
    with pytest.raises(RuntimeError) as e:
        q(DUMMY)
    msg = str(e.value)
    assert msg.startswith("input_q: no activation range has been observed yet")
    assert "training mode" in msg and "load a state dict" in msg


def test_frozen_before_observing_is_still_unobserved():
    q = xnnq.QuantTrainModule(net(), DUMMY)
    freeze_quant_range(q)
    q.train()
    with pytest.raises(RuntimeError, match="no activation range has been observed"):
        q(DUMMY)


# ---------------------------------------------------------------------------------- weights files
def test_weights_file_that_is_not_a_state_dict(tmp_path):
    for i, obj in enumerate([[torch.zeros(2)], {"w": 3}, torch.zeros(3), {"state_dict": ["x"]}]):
        p = tmp_path / f"w{i}.pt"
        torch.save(obj, p)
        with pytest.raises(
            ValueError, match=r"not a state dict of tensors.*torch.save\(model.state_dict\(\), path\)"
        ):
            load_state_dict_file(p)


def test_weights_file_that_is_not_a_torch_file(tmp_path):
    p = tmp_path / "notes.pt"
    p.write_text("hello")
    with pytest.raises(ValueError, match=r"notes.pt: not a loadable weights file with weights_only=True"):
        load_state_dict_file(p)


class _Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_weights_file_with_pickled_code_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "marker.txt"
    p = tmp_path / "evil.pt"
    with open(p, "wb") as f:  # a real torch.save archive whose pickle calls Path.write_text
        torch.save({"conv.weight": torch.zeros(1), "x": _Payload(marker)}, f)
    with pytest.raises(ValueError, match=r"evil.pt: not a loadable weights file with weights_only=True"):
        load_state_dict_file(p)
    assert not marker.exists(), "the pickled code ran"
    with pytest.raises(pickle.UnpicklingError):  # the same guard where users load a QAT checkpoint
        torch.load(p, weights_only=True)
    assert not marker.exists()


def _torch_load_calls(path: Path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "load"
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "torch"
        ):
            yield node


def test_every_torch_load_uses_weights_only():
    """Static check over the product, scripts, benchmarks and examples: ``torch.load(..., weights_only=True)``."""
    bad = []
    for folder in ("xnnq", "scripts", "benchmarks", "examples"):
        for f in sorted((REPO / folder).rglob("*.py")):
            for call in _torch_load_calls(f):
                kw = {k.arg: k.value for k in call.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                if not ok:
                    bad.append(f"{f.relative_to(REPO)}:{call.lineno}")
    assert not bad, f"torch.load without weights_only=True: {bad}"


# ------------------------------------------------------------------------------------------ export
@pytest.mark.parametrize("fmt", ["tidl", "qdq"])
def test_export_before_any_range_was_observed(tmp_path, fmt):
    q = xnnq.QuantTrainModule(net(), DUMMY)
    before = snapshot(q)
    with pytest.raises(
        RuntimeError,
        match=r"input_q: no activation range has been observed yet.*load a (trained )?state.?dict",
    ):
        xnnq.export_onnx(q, DUMMY, tmp_path / "m.onnx", format=fmt)
    assert not (tmp_path / "m.onnx").exists()
    assert_unmodified(q, before)
    assert all(not p.observed for p in q.quantizers().values())


class Softplusy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return F.softplus(self.conv(x))


def test_unsupported_op_at_export_is_named(tmp_path):
    q = trained(xnnq.QuantTrainModule(Softplusy(), DUMMY))
    before = quantizer_ranges(q)
    with pytest.warns(UserWarning, match=r"ops TIDL does not accelerate.*\(Softplus\).*replace them"):
        res = xnnq.export_onnx(q, DUMMY, tmp_path / "m.onnx")
    assert [op for _, op in res.unsupported] == ["Softplus"]
    assert res.unsupported[0][0]  # the node is named
    assert all(
        torch.equal(before[k][1], v[1]) for k, v in quantizer_ranges(q).items()
    )  # export never touches ranges
    assert q.training  # and leaves the mode as it was


def test_export_path_that_cannot_be_written(tmp_path):
    q = trained(xnnq.QuantTrainModule(net(), DUMMY))
    q.eval()
    before = snapshot(q)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(OSError) as e:
            xnnq.export_onnx(q, DUMMY, blocker / "sub" / "m.onnx")
    assert "a_file" in str(e.value)  # names the offending path
    assert_unmodified(q, before)


# ------------------------------------------------------------------------------------- calibration
def test_calibrating_with_zero_batches(tmp_path):
    """train() then eval() with no batch in between: the first use names the quantizer and says what to do
    (an error at eval() itself would be as good); nothing is exported and the float model is untouched."""
    m = net()
    before = snapshot(m)
    q = xnnq.QuantCalibrateModule(m, DUMMY)
    q.train()
    with pytest.raises(RuntimeError) as e:
        q.eval()  # zero calibration batches
        q(DUMMY)
    msg = str(e.value)
    assert "input_q" in msg and ("no activation range" in msg or "no calibration data" in msg)
    assert "calibration" in msg
    assert all(not p.observed for p in q.quantizers().values())
    with pytest.raises(RuntimeError, match="input_q: no activation range"):
        xnnq.export_onnx(q, DUMMY, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
    assert_unmodified(m, before)


def test_calibrating_with_nonfinite_data_names_the_quantizer():
    q = xnnq.QuantCalibrateModule(net(), DUMMY)
    q.train()
    x = torch.randn(2, 3, 8, 8)
    x[0, 0, 0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"^input_q: the calibration tensor holds NaN or Inf"):
        with torch.no_grad():
            q(x)


class FloatBlocks(nn.Module):
    """A conv, a grouped transposed conv (upsampling) and a transformer layer: torch modules with weights xnnq does
    not quantize, next to ones it does."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2, groups=2)
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 4)
        self.extra = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        y = self.up(torch.relu(self.conv(x)))
        return F.linear(self.head(self.encoder(y.flatten(2).transpose(1, 2)).mean(1)), self.extra)


def test_modules_whose_weights_stay_float_are_named():
    """Weights outside Conv2d / Linear / ConvTranspose2d modules (a grouped ConvTranspose2d, a TransformerEncoderLayer run whole, a
    parameter given to F.linear) are not quantized: one RuntimeWarning names each module or call, its weights
    and the fix; modules the user listed in ``leaf_modules`` are left out, and a model of Conv2d / Linear
    layers gets no warning."""
    x = torch.randn(1, 3, 8, 8)
    with pytest.warns(
        RuntimeWarning, match="quantizes the weights of Conv2d, Linear and ConvTranspose2d"
    ) as rec:
        xnnq.QuantTrainModule(FloatBlocks().eval(), x)
    msg = str(next(w.message for w in rec if "Conv2d, Linear and" in str(w.message)))
    assert "`up` (ConvTranspose2d: weight)" in msg
    assert "`encoder` (TransformerEncoderLayer: self_attn.in_proj_weight" in msg
    assert "`linear` (linear: extra)" in msg
    assert "`conv`" not in msg and "`head`" not in msg and "tensor ops torch.fx traces" in msg
    with pytest.warns(RuntimeWarning, match="Conv2d, Linear and ConvTranspose2d") as rec:
        xnnq.QuantCalibrateModule(FloatBlocks().eval(), x, leaf_modules=["encoder"])
    msg = str(next(w.message for w in rec if "Conv2d, Linear and" in str(w.message)))
    assert "`up`" in msg and "encoder" not in msg
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        xnnq.QuantTrainModule(
            nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 2)), x
        )


def opaque_projection(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A function torch.fx keeps whole (``torch.fx.wrap`` below): the graph does not see its matmul."""
    return x @ w.t()


torch.fx.wrap("opaque_projection")


class WrappedWeights(nn.Module):
    """Weights given to a ``torch.fx.wrap``-ped function and to ``@``, beside a quantized Linear."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 8)
        self.proj = nn.Parameter(torch.randn(8, 8))
        self.mix = nn.Parameter(torch.randn(8, 4))

    def forward(self, x):
        return opaque_projection(self.head(x), self.proj) @ self.mix


def test_weights_given_to_wrapped_functions_and_matmul_are_named():
    """A parameter given to a function torch.fx does not look into (``torch.fx.wrap``) or to ``x @ w`` runs in
    float: the warning names the call and the parameter; torchvision's Swin Transformer (its attention is
    such a function, ``shifted_window_attention``, given the qkv and projection weights) is named too."""
    with pytest.warns(RuntimeWarning, match="Conv2d, Linear and ConvTranspose2d") as rec:
        xnnq.QuantTrainModule(WrappedWeights().eval(), torch.randn(2, 8))
    msg = str(next(w.message for w in rec if "Conv2d, Linear and" in str(w.message)))
    assert "`opaque_projection` (opaque_projection: proj)" in msg
    assert "(matmul: mix)" in msg and "`head`" not in msg

    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    swin = SwinTransformer([4, 4], 8, [2], [2], [4, 4], num_classes=4).eval()
    with pytest.warns(RuntimeWarning, match="Conv2d, Linear and ConvTranspose2d") as rec:
        xnnq.QuantTrainModule(swin, torch.randn(1, 3, 32, 32))
    msg = str(next(w.message for w in rec if "Conv2d, Linear and" in str(w.message)))
    qkv_proj = "features.1.0.attn.qkv.weight, features.1.0.attn.proj.weight"
    assert f"(shifted_window_attention: {qkv_proj}" in msg, msg
