"""xnnq.analysis: numbers against hand computations, sensitivity ranking, result I/O and plots."""

import itertools
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import xnnq
from xnnq.analysis import AnalysisResult, analyze, estimated_drop, quantize_float, quantize_pot, suggest_16bit
from xnnq.analysis.metrics import js_divergence
from xnnq.analysis.plots import save_plots
from xnnq.layers.freeze import set_quant_enabled

from conftest import observe


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 3)
        self.fc2 = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _calibrated(model, batches, **kw):
    return observe(xnnq.QuantTrainModule(model, batches[0][:1], **kw), batches, bn_frozen=True)


def _fq(x, s, lo, hi):
    return np.clip(np.round(x / s), lo, hi) * s


def _sqnr(f, q):
    return 10 * np.log10((f**2).sum() / ((q - f) ** 2).sum())


def test_pot_and_minifloat_levels_by_hand():
    w = torch.tensor([0.3, -0.7, 1.0, 0.05, 0.0])
    # POT, top = 1: 0.3 -> 0.25 (below 1.5*0.25), 0.7 -> 0.5, 0.05 -> 1/16 (above 1.5/32)
    assert quantize_pot(w, 8).tolist() == [0.25, -0.5, 1.0, 0.0625, 0.0]
    # E4M3 (max 480): scale 2^-8; 0.3*256 = 76.8 -> binade 64 step 8 -> 80; 0.7*256 = 179.2 -> step 16 -> 176
    # 0.05*256 = 12.8 -> binade 8 step 1 -> 13
    assert quantize_float(w, 8).tolist() == [80 / 256, -176 / 256, 1.0, 13 / 256, 0.0]
    assert quantize_float(torch.tensor([1e-9, 480.0, 1000.0]) * 2.0**-8 * 256, 8).tolist()[1] == 480.0


def test_js_divergence_by_hand():
    assert js_divergence(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])) == pytest.approx(1.0)
    assert js_divergence(torch.tensor([0.3, 0.7]), torch.tensor([0.3, 0.7])) == pytest.approx(0.0)
    hand = 0.5 * (0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25)) + 0.5 * math.log2(1 / 0.75)
    assert js_divergence(torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0])) == pytest.approx(hand)


def test_two_layer_values_match_hand_computation():
    model = TwoLayer().eval()
    with torch.no_grad():
        model.fc1.weight.copy_(
            torch.tensor([[0.9, -0.31, 0.2, 0.05], [-0.4, 0.77, 0.13, -0.6], [0.33, 0.1, -0.82, 0.45]])
        )
    batches = [torch.randn(16, 4) for _ in range(4)]
    q = _calibrated(model, batches)
    res = analyze(q, model, batches, progress=False)

    # weights: fc1 per tensor, power-of-2 scale 2^0/128 (max |w| = 0.9)
    w = model.fc1.weight.detach().numpy().astype(np.float64)
    wq = _fq(w, 1 / 128, -128, 127)
    assert res.layer("fc1").weight_sqnr == pytest.approx(_sqnr(w, wq), abs=1e-4)
    assert res.layer("fc1").scheme_sqnr["INT"] == pytest.approx(_sqnr(w, wq), abs=1e-4)
    assert res.layer("fc1").scheme_sqnr["FLOAT"] > res.layer("fc1").scheme_sqnr["POT"]

    # activations: the ReLU quantizer after fc1 against relu(fc1(x)) of the float model
    qs = q.quantizers()
    s_in, lo_in, hi_in = qs["input_q"].qparams()
    s_a, lo_a, hi_a = qs[q.plan.acts[1].name].qparams()
    wq_t, bq_t = q.module.fc1.quantized_weight_bias(None, qs["input_q"])
    x = torch.cat(batches).numpy().astype(np.float64)
    h = _fq(x, float(s_in), lo_in, hi_in) @ wq_t.detach().numpy().T + bq_t.detach().numpy()
    a_q = _fq(h, float(s_a), lo_a, hi_a)
    a_f = np.maximum(x @ w.T + model.fc1.bias.detach().numpy(), 0)
    row = res.layer("fc1")
    assert row.act_sqnr == pytest.approx(_sqnr(a_f, a_q), abs=1e-3)
    assert row.act_cosine == pytest.approx(
        (a_f * a_q).sum() / np.sqrt((a_f**2).sum() * (a_q**2).sum()), abs=1e-6
    )
    assert row.float_max == pytest.approx(a_f.max(), rel=1e-5)
    clip_hi = float(s_a) * (hi_a + 1)
    assert row.clip_hi == pytest.approx(clip_hi)
    assert row.clip_pct == pytest.approx(100 * (h > clip_hi).mean())
    assert row.sat_pct == pytest.approx(100 * (a_q >= float(s_a) * hi_a).mean())

    # sensitivity of fc1 alone: output with only fc1 (+ its ReLU quantizer) quantized vs all switched off
    set_quant_enabled(q, False)
    with torch.no_grad():
        ref = torch.cat([q(b) for b in batches])
        q.module.fc1.quant_enabled = qs[q.plan.acts[1].name].quant_enabled = True
        one = torch.cat([q(b) for b in batches])
    set_quant_enabled(q, True)
    noise = float((one - ref).double().square().sum() / ref.double().square().sum())
    assert row.sens_noise == pytest.approx(noise, rel=1e-6)
    assert row.sens_agree == pytest.approx(100.0 * float((one.argmax(1) == ref.argmax(1)).float().mean()))
    assert all(m.quant_enabled for m in q.modules() if hasattr(m, "quant_enabled"))


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        chans = [3, 8, 8, 8, 8]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in itertools.pairwise(chans))
        self.bns = nn.ModuleList(nn.BatchNorm2d(b) for b in chans[1:])
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        for conv, bn in zip(self.convs, self.bns):
            x = torch.relu(bn(conv(x)))
        return self.fc(x.mean((2, 3)))


def test_planted_outlier_ranks_first_and_result_io(tmp_path):
    model = SmallCNN().eval()
    with torch.no_grad():
        w = model.convs[2].weight
        w[0, 0, 1, 1] = 40 * w.abs().max()  # one wild weight: the layer's grid becomes ~64x coarser
    batches = [torch.randn(8, 3, 12, 12) for _ in range(3)]
    q = _calibrated(model, batches, constrain_weights=False)
    with torch.no_grad():
        before = q(batches[0])
    res = analyze(q, model, batches, sensitivity_batches=2)
    assert res.ranked()[0].name == "convs.2"
    assert suggest_16bit(res, count=1) == ["convs.2"]
    assert res.layer("convs.2").weight_sqnr < min(
        r.weight_sqnr for r in res.layers if r.weight_sqnr and r.name != "convs.2"
    )
    with torch.no_grad():
        assert torch.equal(q(batches[0]), before)  # flags and mode restored
    assert not q.training

    # the target rule stops once the estimated drop is met; with every layer chosen nothing is left
    names = [r.name for r in res.layers]
    assert estimated_drop(res, names) == pytest.approx(0.0, abs=1e-9) or estimated_drop(res, names) is None
    chosen = suggest_16bit(res, target_drop=1e9)
    assert chosen == []

    # I/O
    md = res.to_markdown()
    assert "`convs.2`" in md and "| 1 | `convs.2`" in md
    back = AnalysisResult.from_json(res.to_json(tmp_path / "a.json"))
    assert [r.name for r in back.ranked()] == [r.name for r in res.ranked()]
    assert json.loads((tmp_path / "a.json").read_text())["layers"][0]["name"] == "convs.2"
    for p in save_plots(res, q, tmp_path / "plots"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000


def test_analyze_rejects_bad_input():
    model = TwoLayer()
    with pytest.raises(TypeError, match="xnnq wrapper"):
        analyze(model, model, [torch.randn(2, 4)])
    q = xnnq.QuantTrainModule(model, torch.randn(1, 4))
    with pytest.raises(RuntimeError, match="no range yet"):
        analyze(q, model, [torch.randn(2, 4)])
    with pytest.raises(ValueError, match="exactly one"):
        suggest_16bit(AnalysisResult([], {}), count=1, target_drop=1.0)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(2, 3)

    def forward(self, x, d):
        return self.a(x) + self.b(d)


def test_a_two_input_model_gets_its_batches_as_input_tuples():
    model = TwoInputs().eval()
    q = xnnq.QuantCalibrateModule(model, (torch.randn(1, 4), torch.randn(1, 2))).train()
    with torch.no_grad():
        q(torch.randn(8, 4), torch.randn(8, 2))
    q.eval()
    # (x, d) reads as (inputs, labels): named, with the form to use
    with pytest.raises(
        ValueError, match=r"takes 2 input\(s\), a batch gives 1.*\(\(input_1, \.\.\., input_n\), labels\)"
    ):
        analyze(q, model, [(torch.randn(8, 4), torch.randn(8, 2))], progress=False)
    res = analyze(
        q, model, [((torch.randn(8, 4), torch.randn(8, 2)), None)], sensitivity_batches=1, progress=False
    )
    assert {r.name for r in res.layers} >= {"a", "b"}


def test_weight_clip_pct_names_the_outlier_clipping():
    model = SmallCNN().eval()
    with torch.no_grad():
        model.convs[1].weight[0, 0, 1, 1] = 40 * model.convs[1].weight.abs().max()
    batches = [torch.randn(4, 3, 8, 8)]
    res = analyze(_calibrated(model, batches), model, batches, sensitivity=False, progress=False)
    n = model.convs[1].weight.numel()
    assert res.layer("convs.1").weight_clip_pct == pytest.approx(100.0 / n)  # exactly the planted weight
    assert res.layer("convs.0").weight_clip_pct == 0.0
    assert res.ranked()[0].name == "convs.1"  # without sensitivity: ranked by weight SQNR
