"""One table of range-preserving ops (xnnq.quantize.preserving) for the plan and the ONNX passes."""

import operator

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import xnnq
from xnnq.export import export_onnx
from xnnq.export.onnx_graph import producers
from xnnq.export.tidl import simplify, torch_to_onnx
from xnnq.layers import ChannelShuffle, Pad, Reshape, Slice, set_quant_enabled
from xnnq.quantize.preserving import PRESERVING_OPS
from xnnq.quantize.wrapper import convert

# one example per torch form of the table: (input shape, call)
X = (1, 4, 6, 6)
EXAMPLES = {
    nn.Flatten: (X, nn.Flatten()),
    nn.Unflatten: (X, nn.Unflatten(1, (2, 2))),
    Reshape: (X, Reshape((4, 36))),
    Slice: (X, Slice((slice(None), slice(1, 3)))),
    Pad: (X, Pad((1, 1, 1, 1))),
    nn.ChannelShuffle: (X, nn.ChannelShuffle(2)),
    ChannelShuffle: (X, ChannelShuffle(2)),
    F.channel_shuffle: (X, lambda x: F.channel_shuffle(x, 2)),
    F.native_channel_shuffle: (X, lambda x: F.native_channel_shuffle(x, 2)),
    nn.Identity: (X, nn.Identity()),
    nn.Dropout: (X, nn.Dropout()),
    nn.Dropout2d: (X, nn.Dropout2d()),
    "flatten": (X, lambda x: x.flatten(1)),
    "unflatten": (X, lambda x: x.unflatten(1, (2, 2))),
    "view": (X, lambda x: x.view(1, 4, 36)),
    "reshape": (X, lambda x: x.reshape(1, 144)),
    "chunk": (X, lambda x: x.chunk(2, 1)[1]),
    "split": (X, lambda x: x.split(1, 1)[2]),
    "transpose": (X, lambda x: x.transpose(2, 3)),
    "permute": (X, lambda x: x.permute(0, 2, 3, 1)),
    "t": ((6, 5), lambda x: x.t()),
    "squeeze": ((1, 1, 6, 6), lambda x: x.squeeze(1)),
    "unsqueeze": (X, lambda x: x.unsqueeze(1)),
    "expand": ((1, 4, 1, 6), lambda x: x.expand(1, 4, 3, 6)),
    "repeat": (X, lambda x: x.repeat(1, 1, 2, 1)),
    "contiguous": (X, lambda x: x.contiguous()),
    torch.flatten: (X, lambda x: torch.flatten(x, 1)),
    torch.reshape: (X, lambda x: torch.reshape(x, (1, 144))),
    operator.getitem: (X, lambda x: x[:, 2]),
    torch.chunk: (X, lambda x: torch.chunk(x, 2, 1)[0]),
    torch.split: (X, lambda x: torch.split(x, 2, 1)[1]),
    torch.transpose: (X, lambda x: torch.transpose(x, 1, 2)),
    torch.permute: (X, lambda x: torch.permute(x, (0, 3, 1, 2))),
    torch.squeeze: ((1, 1, 6, 6), lambda x: torch.squeeze(x, 1)),
    torch.unsqueeze: (X, lambda x: torch.unsqueeze(x, 0)),
    F.dropout: (X, lambda x: F.dropout(x, training=False)),
}
NOT_TENSOR_OPS = {"size", "dim", getattr}  # shape queries: no ONNX value op


class Apply(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


FORMS = [
    (op.name, form, op.onnx)
    for op in PRESERVING_OPS
    for form in (*op.modules, *op.methods, *op.functions)
    if form not in NOT_TENSOR_OPS
]


@pytest.mark.parametrize(
    "row, form, onnx_ops", FORMS, ids=[f"{r}:{getattr(f, '__name__', f)}" for r, f, _ in FORMS]
)
def test_every_torch_form_exports_to_the_onnx_ops_of_its_row(row, form, onnx_ops):
    """Each form, as xnnq's capture and surgery leave it (e.g. a channel shuffle, which torch.onnx cannot export,
    as reshape-transpose-reshape), exports to its row's ONNX ops and computes what the form computes."""
    assert form in EXAMPLES, f"add an example for {form!r} of row {row!r}"
    shape, fn = EXAMPLES[form]
    x = torch.randn(shape)
    gm, _ = convert(Apply(fn).eval(), (x,), (), [])
    with torch.no_grad():
        assert torch.equal(gm(x), Apply(fn).eval()(x))
    model = simplify(torch_to_onnx(gm.eval(), (x,), 18, input_names=["x"], output_names=["y"]))
    ops = {n.op_type for n in model.graph.node} - {"Constant"}
    assert ops <= set(onnx_ops), (row, form, ops)  # none at all: the op vanished from the graph (Identity)


class ExpandThenConv(nn.Module):
    """A conv whose input comes through a range-preserving Expand (or Tile) from a quantized tensor."""

    def __init__(self, tile: bool = False):
        super().__init__()
        self.conv1, self.conv2, self.tile = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1), tile

    def forward(self, x):
        m = torch.relu(self.conv1(x)).mean((2, 3), keepdim=True)
        m = m.repeat(1, 1, 4, 4) if self.tile else m.expand(-1, -1, 4, 4)
        return self.conv2(m)


@pytest.mark.parametrize("tile", [False, True], ids=["Expand", "Tile"])
def test_bias_behind_expand_or_tile_is_quantized_in_qdq(tmp_path, tile):
    model, dummy = ExpandThenConv(tile), torch.randn(1, 3, 8, 8)
    q = xnnq.QuantTrainModule(model, dummy).train()
    q(torch.randn(8, 3, 8, 8))
    spot = q.plan.weight("conv2")
    assert spot.input_quant == "reducemean_q" and spot.output_quant == "conv2_q"
    res = export_onnx(q.eval(), dummy, tmp_path / "m.onnx", format="qdq")
    conv = next(n for n in res.model.graph.node if n.op_type == "Conv" and n.input[1] == "conv2.weight")
    assert {n.op_type for n in res.model.graph.node} >= {"Tile" if tile else "Expand"}
    bias = producers(res.model.graph).get(conv.input[2])
    assert bias is not None and bias.op_type == "DequantizeLinear", "the bias was left in float"
    codes = next(t for t in res.model.graph.initializer if t.name == bias.input[0])
    assert codes.data_type == onnx.TensorProto.INT32


class TupleOps(nn.Module):
    """Tensors taken out of tuples that non-preserving ops return (the values of ``max(dim)`` and ``topk``),
    as model outputs and as the input of a layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.head = nn.Conv2d(1, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        best = y.max(dim=1, keepdim=True)[0]
        top2 = torch.topk(y, 2, dim=1).values
        return self.head(best), top2.sum(1, keepdim=True), y.min(1, keepdim=True).values


def test_a_tensor_taken_out_of_a_tuple_gets_its_own_quantizer(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    q = xnnq.QuantTrainModule(TupleOps(), x).train()
    sum(
        o.pow(2).mean() for o in q(torch.randn(4, 3, 8, 8))
    ).backward()  # used to fail: a quantizer on the tuple
    spots = {a.node: a for a in q.plan.acts}
    taken = [
        n for n in spots if n.startswith(("getitem", "getattr"))
    ]  # max(dim)[0], topk .values, min .values
    assert len(taken) == 3 and {spots[n].how for n in taken} == {"after"}, sorted(spots)
    q.eval()
    res = export_onnx(q, x, tmp_path / "m.onnx", format="qdq")
    r = xnnq.utils.onnx_check(res.path, lambda b: q(b)[0], [torch.randn(2, 3, 8, 8)])
    assert r.max_abs_diff == 0.0


class IteratedSplits(nn.Module):
    """Iterates chunk / split results as YOLOv8's C2f block does (``list(...)``, a loop, ``extend``)."""

    def __init__(self):
        super().__init__()
        self.cv1 = nn.Conv2d(3, 8, 1)
        self.m = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(2))
        self.cv2 = nn.Conv2d(20, 4, 1)

    def forward(self, x):
        y = list(torch.relu(self.cv1(x)).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        parts = [p * 2 for p in y[0].split([1, 3], 1)]
        return self.cv2(torch.cat([*y, *parts], 1)[:, :20])


def test_iterated_chunks_and_splits_trace(tmp_path):
    torch.manual_seed(0)
    model = IteratedSplits().eval()
    x = torch.randn(2, 3, 8, 8)
    q = xnnq.QuantTrainModule(model, x[:1]).eval()
    set_quant_enabled(q, False)  # quantization off: the traced graph computes the float model
    torch.testing.assert_close(q(x), model(x), rtol=1e-5, atol=1e-6)
    assert sum(n.target == "chunk" for n in q.module.graph.nodes) == 1


def test_a_chunk_shorter_than_its_count_is_named_with_the_fix():
    class Few(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 1, 1)

        def forward(self, x):
            return torch.cat(list(self.c(x).chunk(2, 1)), 1)

    with pytest.raises(xnnq.CaptureError, match=r"`chunk` returned fewer tensors than its arguments say"):
        xnnq.QuantTrainModule(Few(), torch.randn(1, 3, 8, 8))
