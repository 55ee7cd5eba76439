"""Regression tests of issue 12's fixes (each failed before its fix)."""

import copy
import json

import pytest
import torch
import torchvision
from torch import nn

import xnnq
from xnnq.analysis.weights import weight_stats
from xnnq.calibrate import QuantCalibrateModule
from xnnq.export import export_onnx
from xnnq.export.check import onnx_check
from xnnq.export.options import SCALE_TYPE_OPTION
from xnnq.export.tidl import torch_to_onnx


# --------------------------------------------------------------------- BatchNorm with γ = 0 in QAT
def test_zero_gamma_channels_train_like_the_float_model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
    with torch.no_grad():
        m[1].weight[2:4] = 0.0  # pruned channels / zero-initialized residual BN
    fm = copy.deepcopy(m).train()
    q = xnnq.QuantTrainModule(m, torch.randn(1, 3, 8, 8)).train()
    bn_out = {}
    q.module.get_submodule("1").register_forward_hook(lambda mod, i, o: bn_out.setdefault("q", o))
    x = torch.randn(16, 3, 8, 8)
    y = q(x)
    with torch.no_grad():  # the float model on the input as quantized inside (its range is not moved again)
        yf = fm(q.quantizers()["input_1_q"].eval()(x))
    assert torch.isfinite(y).all()
    assert torch.equal(bn_out["q"][:, 2:4], yf[:, 2:4])  # β, as the float model
    bn = q.module.get_submodule("1")
    assert torch.allclose(bn.running_mean[2:4], fm[1].running_mean[2:4], rtol=1e-6, atol=1e-7)
    assert torch.allclose(bn.running_var[2:4], fm[1].running_var[2:4], rtol=1e-6, atol=1e-7)
    (y * torch.randn_like(y)).sum().backward()
    grads = {n: p.grad for n, p in q.named_parameters() if p.grad is not None}
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
    assert float(grads["module.1.weight"][2:4].abs().sum()) > 0  # γ can leave 0


def test_torchvision_zero_init_residual_qat_step_is_finite():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10, zero_init_residual=True)
    q = xnnq.QuantTrainModule(model, torch.randn(1, 3, 32, 32)).train()
    out = q(torch.randn(4, 3, 32, 32))
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in q.parameters() if p.grad is not None)


# ------------------------------------------------------------ calibrating from construction
def toy():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 5)
    )


def test_calibration_wrapper_of_an_eval_model_calibrates_from_the_first_batch():
    data = [torch.randn(8, 3, 8, 8) for _ in range(3)]
    from_eval = QuantCalibrateModule(toy().eval(), torch.randn(1, 3, 8, 8))
    from_train = QuantCalibrateModule(toy().train(), torch.randn(1, 3, 8, 8))
    assert from_eval.calibrating and from_eval.training
    with torch.no_grad():
        from_eval(data[0])  # no train() needed
        from_eval.train()  # harmless: the same calibration continues
        for x in data[1:]:
            from_eval(x)
        for x in data:
            from_train(x)
    from_eval.eval()
    from_train.eval()
    assert all(p.observed for p in from_eval.quantizers().values())
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(from_eval(x), from_train(x))
    a, b = from_eval.state_dict(), from_train.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))


def test_loading_a_calibrated_state_keeps_it():
    data = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    q = QuantCalibrateModule(toy(), torch.randn(1, 3, 8, 8), weight_clipping="mse")
    with torch.no_grad():
        for x in data:
            q(x)
    q.eval()
    again = QuantCalibrateModule(toy(), torch.randn(1, 3, 8, 8), weight_clipping="mse")
    again.load_state_dict(q.state_dict())
    again.eval()  # no calibration data: nothing is recomputed
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(again(x), q(x))


# ------------------------------------------------------------- scale type of the exported options
def _trained(**kw):
    q = xnnq.QuantTrainModule(toy(), torch.randn(1, 3, 8, 8), **kw).train()
    q(torch.randn(8, 3, 8, 8))
    return q.eval()


@pytest.mark.parametrize(
    "kw, fmt, want",
    [
        ({}, "tidl", 1),
        ({}, "qdq", 1),
        ({"power2_weight_range": False}, "tidl", 0),
        ({"power2_weight_range": False}, "qdq", 0),
        ({"power2_activation_range": False}, "qdq", 0),
    ],
)
def test_scale_type_matches_the_scales(tmp_path, kw, fmt, want):
    res = export_onnx(_trained(**kw), torch.randn(1, 3, 8, 8), tmp_path / "m.onnx", format=fmt)
    opts = json.loads(res.options_path.read_text())
    assert opts["runtime_options"][SCALE_TYPE_OPTION] == want


def test_float_export_with_non_power2_activations_is_refused(tmp_path):
    q = _trained(power2_activation_range=False)
    with pytest.raises(ValueError, match=r"input_1_q.*power-of-2 scales only.*format='qdq'"):
        export_onnx(q, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx", format="tidl")
    assert not (tmp_path / "m.onnx").exists()


# ---------------------------------------------------------- analysis INT column after MSE clipping
def test_int_column_is_the_deployed_grid_after_mse_weight_clipping():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
    with (
        torch.no_grad()
    ):  # one weight just above 0.25: halving the range 0.5 clips it a little, the rest gain
        for conv in (m[0], m[2]):
            conv.weight.normal_(0.0, 0.02)
            conv.weight.view(-1)[0] = 0.26
    q = QuantCalibrateModule(m, torch.randn(1, 3, 8, 8), weight_clipping="mse", constrain_weights=False)
    with torch.no_grad():
        q(torch.randn(8, 3, 8, 8))
    q.eval()
    stats = weight_stats(q)
    shifted = [n for n in stats if int(q.module.get_submodule(n).weight_range_shift.max()) > 0]
    assert shifted, "the test needs a layer whose range MSE clipping shifted"
    for name, s in stats.items():
        assert s["scheme_sqnr"]["INT"] == s["weight_sqnr"], name


# ------------------------------------------------------------------- onnx_check restores the mode
def test_onnx_check_restores_the_reference_mode_when_it_raises():
    model = torch_to_onnx(nn.Linear(4, 3).eval(), (torch.randn(2, 4),), 18)
    reference = nn.Sequential(nn.Linear(4, 2), nn.Dropout()).train()
    with pytest.raises(ValueError, match="shape"):
        onnx_check(model, reference, [torch.randn(2, 4)])
    assert reference.training
