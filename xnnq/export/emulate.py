"""TIDL emulation of a float ("tidl") export: quantize the float ONNX the way TIDL does, then run it.

TIDL, compiling a QAT model with ``accuracy_level`` 0, takes every ``Clip`` as the range of that
activation (PACT, power-of-2 scales) and quantizes the float weights itself. The emulation does the same
from the ``.onnx`` and its options JSON alone: weight scales from the (folded) float weights (power-of-2
unless the options' ``quantization_scale_type`` is 0; TI does not document its non-power-of-2 rule, xnnq's
``max |w| / (2^(b-1) - 1)`` is used),
activation scales from the Clip bounds, 16-bit where the options' 16-bit lists say so, and writes the
result as an ONNX QDQ model that onnxruntime runs. If the export is right, the re-quantized weights are
the exported ones bit for bit and the emulation computes what the PyTorch simulation computed.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import onnx
import torch
from onnx import numpy_helper

from ..targets import SCALE_TYPE_P2
from .check import onnx_accuracy
from .onnx_graph import consumers
from .options import FEATURE_16BIT_OPTION, PARAMS_16BIT_OPTION, SCALE_TYPE_OPTION, read_options, split_names
from .qdq import ActQuant, WeightQuant, grid_error, to_qdq


def tidl_emulation(path: str | Path, per_channel: bool | Iterable[str] | None = None) -> onnx.ModelProto:
    """The QDQ model TIDL would run for the float export at ``path``.

    ``per_channel``: weight initializers quantized per output channel (True: all); by default the
    ones the export JSON marks per-channel.
    """
    model = onnx.load(str(path))
    opts = read_options(path)
    if opts.get("format") != "tidl":
        raise ValueError(
            f"{path}: TIDL emulation takes a format='tidl' export, this one is {opts.get('format')!r}"
        )
    ro = opts["runtime_options"]
    bits = int(ro.get("tensor_bits", 8))
    weights_power2 = ro.get(SCALE_TYPE_OPTION, SCALE_TYPE_P2) == SCALE_TYPE_P2  # feature maps: always
    feature_16 = set(split_names(ro.get(FEATURE_16BIT_OPTION)))
    params_16 = set(split_names(ro.get(PARAMS_16BIT_OPTION)))
    if per_channel is None:
        per_channel = {w for w, spec in opts.get("weights", {}).items() if spec.get("per_channel")}
    graph = model.graph
    users = consumers(graph)
    acts = {
        n.output[0]: ActQuant(16 if n.output[0] in feature_16 else bits)
        for n in graph.node
        if n.op_type == "Clip"
    }
    init_names = {t.name for t in graph.initializer}
    weights = {}
    for n in graph.node:
        if (
            n.op_type not in ("Conv", "ConvTranspose", "Gemm")
            or len(n.input) < 2
            or n.input[1] not in init_names
        ):
            continue
        out = n.output[0]
        nxt = users.get(out, [])
        names = {out} | ({nxt[0].output[0]} if len(nxt) == 1 and nxt[0].op_type == "Clip" else set())
        wbits = 16 if (names & params_16 or bits == 16) else 8
        pc = per_channel is True or (not isinstance(per_channel, bool) and n.input[1] in set(per_channel))
        weights[n.input[1]] = WeightQuant(wbits, pc, weights_power2)
    return to_qdq(model, acts, weights)


def requantization_error(path: str | Path) -> dict[str, float]:
    """Per Conv/ConvTranspose/Gemm weight of the float export at ``path``: max |w − requantized(w)| under the emulation's
    rule (0.0 when the exported weight is already on its grid, as TIDL needs)."""
    model = tidl_emulation(path)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = {}
    for t in onnx.load(str(path)).graph.initializer:
        dq = next(
            (n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == t.name), None
        )
        if dq is None:
            continue
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        out[t.name] = grid_error(numpy_helper.to_array(t), inits[dq.input[0]], inits[dq.input[1]], axis)
    return out


def emulate_tidl_accuracy(path: str | Path, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Top-1 accuracy (percent) of the TIDL emulation of the float export at ``path``."""
    return onnx_accuracy(tidl_emulation(path), batches)
