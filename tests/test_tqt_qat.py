"""range_learning="tqt" in the wrappers: learned thresholds built from the plan, initialised from statistics,
trained by the user's optimizer; freeze, checkpoint/resume, QuantTestModule and export read them."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import xnnq
from xnnq.calibrate import QuantCalibrateModule
from xnnq.export import export_onnx
from xnnq.export.check import OnnxRunner, onnx_check
from xnnq.export.emulate import requantization_error, tidl_emulation
from xnnq.layers import freeze_quant_range, unfreeze_quant_range
from xnnq.layers.fake_quant import weight_scale_from_max
from xnnq.layers.tqt import LearnedRange
from xnnq.utils import freeze_bn

DUMMY = torch.randn(1, 3, 16, 16)


def small_net() -> nn.Module:
    """Conv+BN+ReLU, a depthwise conv+BN+ReLU6, a residual add, pooling, linear: every kind of quantizer."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(8)
            self.relu = nn.ReLU()
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
            self.bn2 = nn.BatchNorm2d(8)
            self.relu6 = nn.ReLU6()
            self.pw = nn.Conv2d(8, 8, 1)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            y = self.relu(self.bn1(self.conv1(x)))
            z = self.relu6(self.bn2(self.dw(y)))
            z = self.pw(z) + y
            return self.fc(torch.flatten(self.pool(z), 1))

    net = Net()
    with torch.no_grad():  # non-trivial BN statistics
        for bn in (net.bn1, net.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 3.0)
    return net.eval()


def batches(n: int, seed: int = 1, size: int = 8):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 3, 16, 16, generator=g) * 2, torch.randint(0, 4, (size,), generator=g))
        for _ in range(n)
    ]


def tqt(**kw) -> xnnq.QuantTrainModule:
    q = xnnq.QuantTrainModule(small_net(), DUMMY, range_learning="tqt", **kw).train()
    freeze_bn(q)
    return q


def optimizers(q, lr_th: float = 0.05):
    return (
        torch.optim.SGD(q.non_range_parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4),
        torch.optim.Adam(q.range_parameters(), lr=lr_th),
    )


def train(q, data, opts) -> list[float]:
    losses = []
    for x, y in data:
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(q(x), y)
        loss.backward()
        for o in opts:
            o.step()
        losses.append(loss.item())
    return losses


# ---------------------------------------------------------------------------------------------- build
def test_every_quantizer_and_weight_layer_gets_a_learned_range_shaped_by_the_plan():
    q = xnnq.QuantTrainModule(
        small_net(), DUMMY, range_learning="tqt", per_channel_q="depthwise", clip_ranges={"input_q": 4.0}
    )
    acts = q.quantizers()
    assert acts["input_q"].learned_range is None  # a fixed range is not learned
    assert all(p.learned_range is not None for n, p in acts.items() if n != "input_q")
    for w in q.plan.weights:
        lr = q.module.get_submodule(w.name).learned_range
        assert tuple(lr.log2_t.shape) == ((8,) if w.per_channel else ())
    assert q.module.get_submodule("dw").learned_range.log2_t.shape == (8,)  # depthwise: per channel
    assert len(q.range_parameters()) == len(acts) - 1 + len(q.plan.weights)
    ids = {id(p) for p in q.range_parameters()}
    assert ids.isdisjoint(id(p) for p in q.non_range_parameters())
    assert len(q.range_parameters()) + len(q.non_range_parameters()) == len(list(q.parameters()))
    only_acts = xnnq.QuantTrainModule(small_net(), DUMMY, range_learning="tqt-activations")
    assert all(only_acts.module.get_submodule(w.name).learned_range is None for w in only_acts.plan.weights)
    stats = xnnq.QuantTrainModule(small_net(), DUMMY)
    assert stats.range_parameters() == [] and not stats.learned_ranges()


@pytest.mark.parametrize(
    "kw, err, msg",
    [
        ({"range_learning": "lsq"}, ValueError, "range_learning must be one of"),
        ({"range_learning": "tqt", "power2_activation_range": False}, ValueError, "power-of-2"),
        ({"range_init_batches": 0}, ValueError, "range_init_batches"),
        ({"range_learning": "tqt", "range_anchor": "first"}, ValueError, "range_anchor must be one of"),
        (
            {"range_learning": "tqt", "range_hysteresis": 0.7},
            ValueError,
            r"range_hysteresis must be in \[0, 0.5\]",
        ),
    ],
)
def test_bad_settings(kw, err, msg):
    with pytest.raises(err, match=msg):
        xnnq.QuantTrainModule(small_net(), DUMMY, **kw)


def test_calibration_refuses_learned_ranges():
    with pytest.raises(ValueError, match="does not train"):
        QuantCalibrateModule(small_net(), DUMMY, range_learning="tqt")


# ------------------------------------------------------------------------------------ initialisation
@pytest.mark.parametrize("anchor", ["statistics", "init"])
def test_initialised_from_statistics_then_the_same_model_as_statistics(anchor):
    """After the first range_init_batches training batches (no optimizer) the learned thresholds hold the
    statistics' power of two: the model computes exactly what the statistics model computes; then the
    observers go on (anchor "statistics") or stop ("init")."""
    data = batches(3)
    stats = xnnq.QuantTrainModule(small_net(), DUMMY).train()
    learned = xnnq.QuantTrainModule(
        small_net(), DUMMY, range_learning="tqt", range_init_batches=3, range_anchor=anchor
    ).train()
    for q in (stats, learned):
        freeze_bn(q)
        with torch.no_grad():
            for x, _ in data:
                q(x)
    for name, p in learned.quantizers().items():
        s = stats.quantizers()[name]
        assert int(p.observer.num_batches) == 3
        r = torch.maximum(-s.observer.min_val, s.observer.max_val)
        r = r if p.cap is None else r.clamp(max=p.cap)
        # the centre of the statistics range's octave
        assert p.learned_range.log2_t.item() == math.ceil(math.log2(float(r))) - 0.5, name
        assert torch.equal(p.qparams()[0], s.qparams()[0]), name
    for w in learned.plan.weights:  # weights: the max rule's range
        mod = learned.module.get_submodule(w.name)
        wf = mod.folded_weight_bias(learned.module.get_submodule(w.bn) if w.bn else None)[0]
        ref = stats.module.get_submodule(w.name).quantize_weight(wf)[1]
        assert torch.equal(mod.quantize_weight(wf)[1], ref), w.name
    x = torch.randn(4, 3, 16, 16)
    stats.eval(), learned.eval()
    assert torch.equal(stats(x), learned(x))
    learned.train()
    with torch.no_grad():
        learned(x)
    seen = 4 if anchor == "statistics" else 3
    assert all(int(p.observer.num_batches) == seen for p in learned.quantizers().values())
    freeze_quant_range(learned)
    with torch.no_grad():
        learned(x)
    assert all(int(p.observer.num_batches) == seen for p in learned.quantizers().values())  # frozen: stopped


def _qat(range_learning: str, steps: int, lr_th: float, **kw) -> tuple[xnnq.QuantTrainModule, list[float]]:
    """A QAT run on small_net whose inputs grow (x·(1 + i)), so the statistics' powers of two move; the
    ranges freeze after two thirds of the steps, then the weights train on (and their max rule moves)."""
    torch.manual_seed(0)
    q = xnnq.QuantTrainModule(small_net(), DUMMY, range_learning=range_learning, range_init_batches=2, **kw)
    q.train()
    freeze_bn(q)
    opt = torch.optim.SGD(q.non_range_parameters(), lr=0.05, momentum=0.9)
    opts = [opt] + ([torch.optim.Adam(q.range_parameters(), lr=lr_th)] if q.range_parameters() else [])
    losses = []
    for i, (x, y) in enumerate(batches(steps, seed=4)):
        if i == 2 * steps // 3:
            freeze_quant_range(q)
        losses.append(train(q, [(x * (1 + i), y)], opts)[0])
    return q, losses


@pytest.mark.parametrize("per_channel_q", [False, "depthwise"])
def test_anchored_thresholds_that_keep_their_octave_compute_statistics_qat_bit_for_bit(per_channel_q):
    """range_anchor="statistics": while no learned offset reaches half an octave (here: a zero threshold
    learning rate) training is statistics QAT bit for bit — losses, weights, every scale in force, the model
    after the step — although the statistics' powers of two move during it (activations and weights, before
    and after the ranges freeze). With range_anchor="init" the same run departs from it."""
    stats, l_stats = _qat("statistics", 9, 0.0, per_channel_q=per_channel_q)
    learned, l_learned = _qat("tqt", 9, 0.0, per_channel_q=per_channel_q)
    assert l_learned == l_stats
    moved = 0
    for name, p in learned.quantizers().items():
        s = stats.quantizers()[name]
        assert torch.equal(p.scale(), s.scale()), name
        moved += int(
            p.learned_range is not None and bool((p.learned_range.shift(p.statistics_range()) != 0).any())
        )
    assert moved >= 3  # the statistics' powers of two did move: the thresholds followed them
    for w in learned.plan.weights:
        a, b = learned.module.get_submodule(w.name), stats.module.get_submodule(w.name)
        assert torch.equal(a.weight, b.weight), w.name
    x = torch.randn(4, 3, 16, 16)
    learned.eval(), stats.eval()
    assert torch.equal(learned(x), stats(x))  # weights stepped after the last forward: the max rule moved
    _, l_init = _qat("tqt", 9, 0.0, per_channel_q=per_channel_q, range_anchor="init")
    assert l_init != l_stats


def test_anchored_threshold_keeps_its_learned_offset_when_the_statistics_move():
    """The threshold in force is the statistics' power of two moved by the learned whole octaves."""
    lr = LearnedRange(init_batches=1)
    lr.init_from(torch.tensor(5.0))  # octave (4, 8]: anchor 2.5
    with torch.no_grad():
        lr.log2_t.add_(-0.7)  # learned: one octave down (ceil(1.8) = 2)
    assert lr.range(8, True, r=torch.tensor(5.0)) == 4.0
    assert lr.range(8, True, r=torch.tensor(20.0)) == 16.0  # statistics 32: one octave below it
    assert lr.range(8, True, r=torch.tensor(0.3)) == 0.25  # statistics 0.5
    lr.frozen = True
    assert lr.range(8, True, r=torch.tensor(20.0)) == 16.0
    with pytest.raises(ValueError, match="pass their range r"):
        lr.range(8, True)  # an anchored threshold is nothing without the statistics
    unanchored = LearnedRange(init_batches=1, anchor="init")
    unanchored.init_from(torch.tensor(5.0))
    assert (
        unanchored.range(8, True, r=torch.tensor(20.0)) == 8.0
        and unanchored.shift(torch.tensor(20.0)) is None
    )
    with pytest.raises(ValueError, match="anchor must be one of"):
        LearnedRange(anchor="stats")


def test_thresholds_receive_gradients_and_learn():
    q = tqt(range_init_batches=1)
    opts = optimizers(q)
    before = {k: v.log2_t.detach().clone() for k, v in q.learned_ranges().items()}
    train(q, batches(1), opts)  # the initialising batch
    grads = {k: v.log2_t.grad for k, v in q.learned_ranges().items()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert sum(bool((g != 0).any()) for g in grads.values()) >= len(grads) - 1
    train(q, batches(5, seed=2), opts)
    after = {k: v.log2_t.detach() for k, v in q.learned_ranges().items()}
    assert all(not torch.equal(before[k], after[k]) for k in before)


def test_relu6_cap_bounds_the_learned_range():
    q = tqt(range_init_batches=1)
    relu6 = q.quantizers()["relu6"]
    with torch.no_grad():
        relu6.learned_range.log2_t.fill_(10.0)  # far above the cap
    q.eval()
    assert relu6.clip_values() == (0.0, 6.0)
    assert float(relu6.scale()) == 8.0 / 256  # 2^ceil(log2 6) / 2^8


def test_learned_weight_range_is_capped_at_the_max_rule():
    q = tqt(range_init_batches=1)
    train(q, batches(1), optimizers(q))
    conv = q.module.get_submodule("conv1")
    wf = conv.folded_weight_bias(q.module.get_submodule("bn1"))[0]
    rule = weight_scale_from_max(wf.detach().abs().amax(), 8)
    with torch.no_grad():
        conv.learned_range.log2_t.fill_(20.0)
    assert torch.equal(conv.quantize_weight(wf)[1], rule)
    with torch.no_grad():
        conv.learned_range.log2_t.fill_(math.log2(float(rule) * 128) - 1.5)  # ceil: one power below: clips
    wq, s = conv.quantize_weight(wf)
    assert float(s) == float(rule) / 2 and float(wq.detach().abs().max()) <= 128 * float(s)
    assert float(wq.detach().abs().max()) < float(wf.detach().abs().max())


def test_16_bit_layers_learn_too():
    q = tqt(range_init_batches=1, bitwidth_overrides={"conv1": 16})
    train(q, batches(2), optimizers(q))
    q.eval()
    s, qmin, qmax = q.quantizers()["relu"].qparams()
    assert (qmin, qmax) == (0, 65535)
    relu = q.quantizers()["relu"]
    assert float(s) == float(relu.learned_range.range(16, False, r=relu.statistics_range())) / 65536


# ------------------------------------------------------------------------------------------ freezing
def test_freeze_keeps_every_scale_while_training_goes_on_and_unfreeze_resumes():
    q = tqt(range_init_batches=1)
    opts = optimizers(q, lr_th=0.2)
    train(q, batches(3), opts)
    held = {k: v.anchor + v.held for k, v in q.learned_ranges().items()}  # the octaves in force (hysteresis)
    assert freeze_quant_range(q) == len(q.quantizers())
    scales = {k: v.frozen_log2_t.clone() for k, v in q.learned_ranges().items()}
    assert all(torch.equal(scales[k], held[k]) for k in held)  # frozen: the centre of the octave in force
    act_scales = {k: p.scale() for k, p in q.quantizers().items()}
    train(q, batches(6, seed=3), opts)  # Adam's momentum still moves log2_t; the thresholds held do not
    assert all(torch.equal(v.frozen_log2_t, scales[k]) for k, v in q.learned_ranges().items())
    assert all(torch.equal(p.scale(), act_scales[k]) for k, p in q.quantizers().items())  # nor activations'
    assert any(not torch.equal(v.log2_t.detach(), scales[k]) for k, v in q.learned_ranges().items())
    assert all(v.log2_t.grad is not None and not v.log2_t.grad.any() for v in q.learned_ranges().values())
    q.train(), q.eval(), q.train()  # modes never unfreeze
    assert all(v.frozen for v in q.learned_ranges().values())
    unfreeze_quant_range(q)
    assert all(torch.equal(v.log2_t.detach(), scales[k]) for k, v in q.learned_ranges().items())


# -------------------------------------------------------------------------------- checkpoint / resume
def test_checkpoint_resume_is_bit_identical(tmp_path):
    """Save model and both optimizers in the middle of the initialising batches, resume in a fresh wrapper:
    the next steps are bit-identical to the uninterrupted run (through the init phase and a freeze)."""
    data = batches(7, seed=5)
    a = tqt(range_init_batches=3)
    opts_a = optimizers(a)
    train(a, data[:2], opts_a)
    torch.save(
        {"model": a.state_dict(), "opt": opts_a[0].state_dict(), "opt_th": opts_a[1].state_dict()},
        tmp_path / "ckpt.pt",
    )
    train(a, data[2:5], opts_a)
    freeze_quant_range(a)
    losses_a = train(a, data[5:], opts_a)

    b = tqt(range_init_batches=3)
    opts_b = optimizers(b)
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    b.load_state_dict(state["model"])
    opts_b[0].load_state_dict(state["opt"])
    opts_b[1].load_state_dict(state["opt_th"])
    assert all(v.init_steps == 2 for v in b.learned_ranges().values())
    train(b, data[2:5], opts_b)
    freeze_quant_range(b)
    assert train(b, data[5:], opts_b) == losses_a
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if isinstance(sa[k], torch.Tensor):
            assert torch.equal(sa[k], sb[k]), k
        else:
            assert sa[k] == sb[k], k


# ------------------------------------------------------------------------------------ QuantTestModule
def test_test_module_evaluates_the_learned_state_and_refuses_a_mismatch():
    q = tqt(range_init_batches=1)
    train(q, batches(4), optimizers(q))
    q.eval()
    qt = xnnq.QuantTestModule(small_net(), DUMMY, range_learning="tqt")
    qt.load_state_dict(q.state_dict())
    x = torch.randn(4, 3, 16, 16)
    assert torch.equal(qt(x), q(x))
    with pytest.raises(ValueError, match=r"conv1: the state dict holds a learned range.*range_learning"):
        xnnq.QuantTestModule(small_net(), DUMMY).load_state_dict(q.state_dict())
    with pytest.raises(ValueError, match=r"saved with range_anchor='statistics'.*range_anchor='statistics'"):
        xnnq.QuantTestModule(small_net(), DUMMY, range_learning="tqt", range_anchor="init").load_state_dict(
            q.state_dict()
        )
    stats = xnnq.QuantTrainModule(small_net(), DUMMY)
    with pytest.raises(ValueError, match=r"learns its range.*range_learning"):
        xnnq.QuantTestModule(small_net(), DUMMY, range_learning="tqt").load_state_dict(stats.state_dict())


# ------------------------------------------------------------------------------------------------ export
@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    q = tqt(range_init_batches=1)
    opts = optimizers(q, lr_th=0.3)  # large steps: thresholds end away from the statistics
    train(q, batches(8, seed=7), opts)
    return q.eval()


def test_export_reads_the_learned_ranges(trained, tmp_path):
    """tidl: each Clip's bounds are ±2^ceil(log2 t) (or the ReLU6 cap); qdq: each activation scale is
    2^ceil(log2 t) / levels and each weight scale the learned one; both agree with the simulation."""
    q = trained
    moved = [
        n
        for n, p in q.quantizers().items()
        if round(
            math.log2(
                float(p.learned_range.range(p.bits, p.resolved_signed(), p.log2_cap(), p.statistics_range()))
            )
        )
        != math.ceil(math.log2(max(float(torch.maximum(-p.observer.min_val, p.observer.max_val)), 2**-24)))
    ]
    assert moved, "the thresholds should have left the statistics' powers of two in this test"
    res = export_onnx(q, DUMMY, tmp_path / "m.onnx")
    opts = json.loads(res.options_path.read_text())
    for name, p in q.quantizers().items():
        t = opts["quantizers"][name]
        u = p.learned_range.in_force(p.statistics_range()).item()
        r = 2.0 ** math.ceil(min(u, math.log2(p.cap)) if p.cap else u)
        lo, hi = opts["activation_ranges"][t]
        assert hi == (min(r, p.cap) if p.cap else r), name
        assert lo == (-r if p.resolved_signed() else 0.0), name
        levels = 2 ** (p.bits - 1) if p.resolved_signed() else 2**p.bits
        assert opts["activation_scales"][t] == r / levels, name
    model = onnx.load(str(res.path))
    clip_bounds = {
        n.output[0]: tuple(
            float(numpy_helper.to_array(i))
            for i in [next(t for t in model.graph.initializer if t.name == nm) for nm in n.input[1:]]
        )
        for n in model.graph.node
        if n.op_type == "Clip"
    }
    assert {k: list(v) for k, v in clip_bounds.items()} == opts["activation_ranges"]
    assert max(requantization_error(res.path).values()) == 0.0  # TIDL's rule leaves the learned grid as it is
    x = torch.randn(6, 3, 16, 16)
    assert onnx_check(res.path, res.module, [x]).max_abs_diff <= 1e-5
    qdq = export_onnx(q, DUMMY, tmp_path / "m_qdq.onnx", format="qdq")
    qm = onnx.load(str(qdq.path))
    inits = {t.name: numpy_helper.to_array(t) for t in qm.graph.initializer}
    for w in q.plan.weights:
        mod = q.module.get_submodule(w.name)
        s = mod.quantize_weight(mod.folded_weight_bias(q.module.get_submodule(w.bn) if w.bn else None)[0])[1]
        assert np.array_equal(inits[f"{w.name}.weight_scale"], s.detach().numpy()), w.name
    xnnq.layers.set_rounding(q, "half_even")  # what onnxruntime computes
    try:
        assert onnx_check(qdq.path, q, [x]).max_abs_diff == 0.0
        emu = tidl_emulation(res.path)  # TIDL's reading of the float export, run in onnxruntime
        emu.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
        assert torch.equal(torch.cat([OnnxRunner(emu)(x[i : i + 1]) for i in range(6)]), q(x))
    finally:
        xnnq.layers.set_rounding(q, "tidl")
