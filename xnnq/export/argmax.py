"""The export's optional ``ArgMax`` head, as TI's segmentation models end for TIDL.

TI's edgeai "lite" segmentation models take ``torch.argmax(x, dim=1, keepdim=True)`` of the final
(resized) logits in eval mode, so the exported graph ends in one ``ArgMax`` and the device writes a
one-channel class-index map instead of C channels of scores (edgeai-tensorlab,
``references/edgeailite/.../pixel2pixel/deeplabv3plus_edgeailite.py``). TIDL's ``ArgMax`` takes only
``keepdims=1``, ``axis=-3`` and ``select_last_index=0`` (edgeai-tidl-tools
``docs/supported_ops_rts_versions.md``); the head is written that way. ONNX defines ArgMax's output as
int64; ties go to the first index, as in ``torch.argmax``.
"""

from __future__ import annotations

import copy

import onnx
import torch
from torch import fx

ARGMAX_AXIS = -3  # the channel axis of N x C x H x W, spelled as TIDL's supported-ops table spells it


def with_argmax(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of the export graph ``gm`` whose first output is replaced by its ArgMax (channel axis, keepdim).

    The modules are shared, so parameter names (and ONNX initializer names) stay those of ``gm``. A dict
    output (torchvision's ``{"out": ..., "aux": ...}``) keeps its keys, a tuple its other entries.
    """
    graph = copy.deepcopy(gm.graph)
    out_node = next(n for n in graph.nodes if n.op == "output")
    out = out_node.args[0]
    first = (
        next(iter(out.values()))
        if isinstance(out, dict)
        else out[0]
        if isinstance(out, (tuple, list))
        else out
    )
    if not isinstance(first, fx.Node):
        raise TypeError("export_onnx(argmax=True): the model's first output is not a tensor")
    with graph.inserting_before(out_node):
        am = graph.call_function(_argmax, (first,))
    if isinstance(out, dict):
        key = next(iter(out))
        new = {**out, key: am}
    elif isinstance(out, (tuple, list)):
        new = type(out)([am, *out[1:]])
    else:
        new = am
    out_node.args = (new,)
    result = fx.GraphModule(gm, graph, "ExportGraphArgMax")
    return result.eval()


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """ArgMax over the channel axis, keepdim: N x C x H x W scores -> N x 1 x H x W int64 indices."""
    if x.dim() != 4:
        raise ValueError(
            f"export_onnx(argmax=True): the model's first output has shape {tuple(x.shape)}; the "
            "ArgMax head needs N x C x H x W class scores (a segmentation model). Export without argmax."
        )
    return torch.argmax(x, dim=ARGMAX_AXIS, keepdim=True)


def normalize_argmax_axis(model: onnx.ModelProto) -> onnx.ModelProto:
    """Write every 4-D ``ArgMax`` with ``axis=-3`` (the exporter may write the equivalent ``axis=1``)."""
    for node in model.graph.node:
        if node.op_type != "ArgMax":
            continue
        for a in node.attribute:
            if a.name == "axis" and a.i == 1:
                a.i = ARGMAX_AXIS
    return model
