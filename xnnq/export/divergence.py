"""Where three computations of one QDQ file part: the integer codes of every quantized tensor from the
PyTorch simulation, onnxruntime and the integer reference, compared in topological order.

Used by :func:`xnnq.export.check.onnx_check` on the first batch whose outputs disagree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from ..layers.pact2 import PACT2
from .options import options_path, read_options
from .reference import IntegerReference

_ONNX_CODE = {
    np.int8: TensorProto.INT8,
    np.uint8: TensorProto.UINT8,
    np.int16: TensorProto.INT16,
    np.uint16: TensorProto.UINT16,
}


def ort_codes(
    ref: IntegerReference, x: np.ndarray, optimize: bool = True, threads: int = 0
) -> dict[str, np.ndarray]:
    """onnxruntime's integer codes of every QuantizeLinear output of ``ref``'s model on the batch ``x``.

    The codes are read as extra graph outputs, and that changes onnxruntime's QDQ fusion (on the RetinaNet
    core, 62 fused ``QLinearConv`` instead of 95; a conv whose output codes are a graph output may run as
    a float ``Conv``): a difference that exists only inside a fused kernel (its int32 accumulator) can be
    absent here while the plain session's outputs show it."""
    from .check import ort_session

    model = onnx.ModelProto.FromString(ref.model.SerializeToString())
    have = {o.name for o in model.graph.output}
    names = [p.codes for p in ref.points]
    for p in ref.points:
        if p.codes not in have:
            model.graph.output.append(helper.make_tensor_value_info(p.codes, _ONNX_CODE[p.dtype], None))
    sess = ort_session(model, optimize, threads)
    inp = sess.get_inputs()[0]
    batch = inp.shape[0] if isinstance(inp.shape[0], int) else x.shape[0]
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for i in range(0, x.shape[0], batch):
        chunk = x[i : i + batch]
        n = chunk.shape[0]
        if n < batch:
            chunk = np.concatenate([chunk, np.zeros((batch - n, *chunk.shape[1:]), chunk.dtype)])
        for name, v in zip(names, sess.run(names, {inp.name: chunk})):
            parts[name].append(v[:n])
    return {k: np.concatenate(v) for k, v in parts.items()}


def _quantizers(module: Any) -> dict[str, PACT2]:
    if hasattr(module, "quantizers"):
        return dict(module.quantizers())
    if isinstance(module, torch.nn.Module):
        return {n: m for n, m in module.named_modules() if isinstance(m, PACT2)}
    return {}


@torch.no_grad()
def sim_codes(
    module: Any, x: torch.Tensor, ref: IntegerReference, path: str | Path | None
) -> dict[str, np.ndarray]:
    """The simulation's integer codes (output / scale of each PACT2) by QuantizeLinear output name, through
    the quantizer → tensor table of the export JSON beside ``path`` (empty when it is not available)."""
    qs = _quantizers(module)
    if not qs or path is None or not options_path(path).is_file():
        return {}
    tensor_of = read_options(path).get("quantizers", {})
    codes_of = {p.tensor: p.codes for p in ref.points}
    captured: dict[str, np.ndarray] = {}
    handles = []
    for name, m in qs.items():
        key = tensor_of.get(name) or tensor_of.get(name.removeprefix("module."))
        if key not in codes_of or not m.quant_enabled:
            continue

        def hook(mod, args, out, codes=codes_of[key]):
            scale = mod.qparams()[0]
            captured[codes] = torch.round(out.detach() / scale).cpu().numpy().astype(np.int64)

        handles.append(m.register_forward_hook(hook))
    try:
        module(x)
    finally:
        for h in handles:
            h.remove()
    return captured


def first_divergence(
    ref: IntegerReference, codes: dict[str, dict[str, np.ndarray]]
) -> dict[str, dict] | None:
    """For each pair of sources (``"sim"``, ``"ort"``, ``"ref"``) that disagree: the first quantized tensor
    (topological order) where their codes differ, how many elements differ there and by how many LSB."""
    out: dict[str, dict] = {}
    keys = [k for k in ("sim", "ort", "ref") if codes.get(k)]
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            for p in ref.points:
                ca, cb = codes[a].get(p.codes), codes[b].get(p.codes)
                if ca is None or cb is None or ca.shape != cb.shape:
                    continue
                d = np.abs(ca.astype(np.int64) - cb.astype(np.int64))
                if d.any():
                    out[f"{a}-{b}"] = {
                        "tensor": p.tensor,
                        "quantize_node": p.node,
                        "elements": int((d != 0).sum()),
                        "of": int(d.size),
                        "max_lsb": int(d.max()),
                    }
                    break
    return out or None
