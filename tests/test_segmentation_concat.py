"""Concat of inputs with different scales: the simulation, the QDQ export and the TIDL emulation against a
hand computation.

TIDL gives every layer, Concat included, one per-tensor output scale (quantization proto: one ``outputs``
range per layer) and a Concat cannot change precision (docs/tidl_fsg_quantization.md); how the inputs are
brought to the output scale is not documented. xnnq keeps each input's own quantizer (its producer's
output, e.g. a ReLU) and puts one quantizer on the Concat output, so each input is requantized from its
own power-of-2 grid onto the output's (round half to even, like every quantizer). The numbers below are
chosen so that this double rounding differs from a single rounding straight onto the output grid.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import xnnq
from xnnq.export.check import ort_session
from xnnq.export.emulate import tidl_emulation
from xnnq.export.options import read_options


class TwoScaleCat(nn.Module):
    """Branch A: 1x1 conv (w = 0.75) + ReLU with range 2; branch B: ReLU with range 8; Concat of both."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1, bias=False)
        self.conv.weight.data.fill_(0.75)
        self.ra = nn.ReLU()
        self.rb = nn.ReLU()

    def forward(self, a, b):
        return torch.cat([self.ra(self.conv(a)), self.rb(b)], 1)


def _rq(x: torch.Tensor, step: float, qmax: int = 255) -> torch.Tensor:
    """Unsigned 8-bit fake quantization by hand: round half to even, clamp to [0, qmax]."""
    return torch.clamp(torch.round(x / step), 0, qmax) * step


@pytest.fixture(scope="module")
def setup():
    k = torch.arange(128, dtype=torch.float32)
    a = (k / 64).view(1, 1, 1, 128)  # on the input grid of a_q (range 2, signed: 1/64)
    b = torch.linspace(0, 7.875, 128).view(1, 1, 1, 128)
    q = xnnq.QuantTrainModule(
        TwoScaleCat(), (a, b), clip_ranges={"a_q": 2.0, "b_q": 8.0, "ra": 2.0, "rb": 8.0}
    )
    q.train()
    with torch.no_grad():
        q(a, b)  # cat_q observes its range: max 7.875 -> 8, unsigned
    q.eval()
    return q, a, b


def test_concat_requantizes_each_input_to_the_output_scale(setup, tmp_path):
    q, a, b = setup
    quant = q.quantizers()
    scale, qmin, qmax = quant["cat_q"].qparams()
    assert (float(scale), qmin, qmax) == (1 / 32, 0, 255)  # one output scale for the whole Concat
    assert float(quant["ra"].qparams()[0]) == 1 / 128 and float(quant["rb"].qparams()[0]) == 1 / 32
    # the single weight 0.75 is on its power-of-2 grid and kept (a σ = 0 tensor has no outliers to clip)
    assert float(xnnq.export.export_graph(q)[0].conv.weight) == 0.75

    # by hand: A on its own grid (1/128), then requantized onto the Concat grid (1/32); B already on it
    a_in = a  # exactly on a_q's grid
    branch_a = _rq(0.75 * a_in, 1 / 128)
    expected = torch.cat([_rq(branch_a, 1 / 32), _rq(_rq(b, 1 / 16, 127), 1 / 32)], 1)
    single = torch.cat([_rq(0.75 * a_in, 1 / 32), expected[:, 1:]], 1)
    assert (expected != single).any(), "the case must tell requantization from a single rounding"
    with torch.no_grad():
        sim = q(a, b)
    assert torch.equal(sim, expected)

    # the QDQ export in onnxruntime computes the same (DequantizeLinear per input, Concat, one QuantizeLinear)
    res = xnnq.export_onnx(q, (a, b), tmp_path / "cat_qdq.onnx", format="qdq")
    assert res.op_counts()["Concat"] == 1
    feeds = {i.name: t.numpy() for i, t in zip(ort_session(res.path).get_inputs(), (a, b))}
    got = ort_session(res.path).run(None, feeds)[0]
    np.testing.assert_array_equal(got, expected.numpy())

    # the float ("tidl") export carries each input's range as a Clip and the Concat's as one Clip after it;
    # TIDL's quantization of that file (emulated) gives the same numbers
    res = xnnq.export_onnx(q, (a, b), tmp_path / "cat_tidl.onnx", format="tidl")
    model = onnx.load(str(res.path))
    cat = next(n for n in model.graph.node if n.op_type == "Concat")
    users = [n for n in model.graph.node if cat.output[0] in n.input]
    assert [n.op_type for n in users] == ["Clip"]
    tensor = read_options(res.path)["quantizers"]  # quantizer -> ONNX tensor (the output keeps its name)
    ranges = {name: res.activation_ranges[tensor[name]] for name in ("ra", "rb", "cat_q")}
    assert ranges == {"ra": (0.0, 2.0), "rb": (0.0, 8.0), "cat_q": (0.0, 8.0)}
    emu = tidl_emulation(res.path)
    sess = ort_session(emu)
    got = sess.run(None, {i.name: t.numpy() for i, t in zip(sess.get_inputs(), (a, b))})[0]
    np.testing.assert_array_equal(got, expected.numpy())


def test_concat_output_range_covers_every_input(setup):
    q, a, b = setup
    # the Concat's quantizer sees the union of its inputs: the wide branch (B, range 8) sets the scale,
    # the narrow branch (A, range 2) loses its two finest bits at the Concat (1/128 -> 1/32)
    lo, hi = q.quantizers()["cat_q"].clip_values()
    assert (lo, hi) == (0.0, 8.0)
    with torch.no_grad():
        out = q(a, b)
    assert torch.equal(torch.remainder(out * 32, 1), torch.zeros_like(out))
