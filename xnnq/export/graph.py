"""The export graph: the quantized model as a plain float network that computes what eval computes.

Built from ``qmodel.module`` (a ``torch.fx.GraphModule``) and ``qmodel.plan`` by graph transformation,
never by editing the quantized model:

* every weight layer of the plan becomes a plain ``nn.Conv2d`` / ``nn.ConvTranspose2d`` / ``nn.Linear`` (:class:`RowsLinear`: on an
  input of other than two dimensions it exports as Reshape, Gemm, Reshape) holding
  ``quantized_weight_bias(bn, input_quant)`` (the BatchNorm and input quantizer the plan names) —
  BatchNorm folded, weights and bias already on their quantization grid; the BatchNorm / quantizer
  ``get_attr`` arguments are dropped;
* every activation quantizer of the plan becomes a :class:`Clip` with the quantizer's float interval
  (``clip_values()``), or the op it replaced when its quantization is switched off;
* ``Dropout`` / ``Identity`` nodes are removed (eval mode: they pass their input through).

The result is a ``GraphModule`` in eval mode with no parameters that require grad, plus the list of
:class:`ClipInfo` (one per quantized activation) that the range table and the QDQ conversion read.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
from torch import fx, nn

from ..layers.pact2 import PACT2
from ..layers.quant_weight import QuantConv2d, QuantConvTranspose2d, QuantLinear
from ..quantize.plan import Plan

DROPPED = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)


class Clip(nn.Module):
    """``clamp(x, lo, hi)`` with constant float bounds: one ONNX ``Clip`` carrying a quantizer's range."""

    def __init__(self, lo: float, hi: float):
        super().__init__()
        self.lo, self.hi = float(lo), float(hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, self.lo, self.hi)

    def extra_repr(self) -> str:
        return f"lo={self.lo}, hi={self.hi}"


@dataclass
class ClipInfo:
    """One quantized activation of the export graph."""

    name: str  # PACT2 module path (also the ONNX tensor name given to its output)
    lo: float
    hi: float
    bits: int
    signed: bool
    power2: bool
    scale: float  # the quantizer's scale (power of 2 when power2)


@dataclass
class LayerInfo:
    """One weight layer of the export graph."""

    name: str  # module path of the conv/linear
    bits: int
    per_channel: bool
    power2: bool
    input_quant: str | None  # PACT2 name of its input quantizer
    scale: torch.Tensor | None = None  # its weight scale (0-d or per output channel); None: not quantized


def _check_ready(name: str, q: PACT2) -> None:
    if q.quant_enabled and not q.observed:
        raise RuntimeError(
            f"{name}: no activation range has been observed yet; run forward passes in training mode "
            "(QAT or calibration) or load a trained state_dict before exporting."
        )


@torch.no_grad()
def build_export_graph(
    qmodule: fx.GraphModule, plan: Plan
) -> tuple[fx.GraphModule, list[ClipInfo], list[LayerInfo]]:
    """The float export graph of an xnnq ``GraphModule`` and its plan (see the module docstring)."""
    src = qmodule
    graph = copy.deepcopy(src.graph)
    mods: dict[str, nn.Module] = {}
    clips: list[ClipInfo] = []
    layers: list[LayerInfo] = []
    weight_spots = {w.name: w for w in plan.weights}
    act_spots = {a.name: a for a in plan.acts}
    saturated: list[str] = []  # layers whose int32 bias codes saturate
    for node in list(graph.nodes):
        if node.op != "call_module":
            continue
        mod = src.get_submodule(node.target)
        if node.target in weight_spots:
            spot = weight_spots[node.target]
            layer: QuantConv2d | QuantConvTranspose2d | QuantLinear = mod
            bn = src.get_submodule(spot.bn) if spot.bn else None
            in_q: PACT2 | None = src.get_submodule(spot.input_quant) if spot.input_quant else None
            if bn is not None and bn.training:
                raise RuntimeError(
                    f"{node.target}: its BatchNorm is in training mode; call qmodel.eval() before export."
                )
            w, b, scale = layer.quantized_weight_bias_scale(bn, in_q)
            scale = None if scale is None else scale.detach().cpu()
            b_float = layer.folded_weight_bias(bn)[1]
            if b is not None and scale is not None and in_q is not None and in_q.quant_enabled:
                step = in_q.qparams()[0].detach().cpu() * scale  # the bias's int32 step, per output channel
                off = ((b_float.detach().cpu() - b.detach().cpu()).abs() > step).sum()
                if off:
                    saturated.append(f"{node.target} ({int(off)} of {b.numel()} channels)")
            mods[node.target] = _plain_layer(layer, w, b)
            node.args = node.args[:1]  # (x, bn, input_quant) -> (x,)
            layers.append(
                LayerInfo(
                    node.target,
                    spot.bits,
                    spot.per_channel,
                    spot.power2,
                    spot.input_quant if in_q is not None and in_q.quant_enabled else None,
                    scale,
                )
            )
        elif node.target in act_spots:
            spot = act_spots[node.target]
            _check_ready(node.target, mod)
            if mod.quant_enabled:
                lo, hi = mod.clip_values()
                scale, qmin, _ = mod.qparams()
                mods[node.target] = Clip(lo, hi)
                clips.append(ClipInfo(node.target, lo, hi, spot.bits, qmin < 0, spot.power2, float(scale)))
            elif mod.signed is False:
                mods[node.target] = (
                    nn.ReLU6()
                    if mod.cap == 6.0
                    else (Clip(0.0, float(mod.cap)) if mod.cap is not None else nn.ReLU())
                )
            else:
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
        elif isinstance(mod, DROPPED):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
        else:
            mods[node.target] = copy.deepcopy(mod)
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
        elif node.op == "get_attr":  # a tensor the model's own code reads (a learned scale...): a constant
            value = src
            for part in node.target.split("."):
                value = getattr(value, part)
            mods[node.target] = value.detach().clone() if isinstance(value, torch.Tensor) else value
    gm = fx.GraphModule(mods, graph, "ExportGraph")
    gm.graph.lint()
    gm.eval()
    for p in gm.parameters():
        p.requires_grad_(False)
    if saturated:
        warnings.warn(
            f"export: the int32 bias saturates in {', '.join(saturated[:6])}{' ...' if len(saturated) > 6 else ''}: "
            "its step, input scale x weight scale, is too small for the bias (a learned weight threshold, "
            "which keeps its scale, on a channel with near-zero weights; or the accumulator headroom of 8-bit "
            "operands). The simulation and the export clip it alike, so the accuracy lost is already in the "
            "simulation. Quantize these layers' weights per tensor (per_channel_q=False) or with the max rule "
            "(range_learning='tqt-activations').",
            RuntimeWarning,
            stacklevel=3,
        )
    return gm, clips, layers


class RowsLinear(nn.Linear):
    """``nn.Linear`` that reads an input of other than two dimensions as rows (``(..., in) -> (-1, in)``, the
    linear map, then back): it exports as Reshape, ``Gemm`` with the weight initializer itself (``transB=1``),
    Reshape. (torch.onnx exports a plain ``nn.Linear`` on such an input as ``MatMul`` with a transposed copy
    of the weight, which loses the weight's name and layout.)"""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            return super().forward(x)
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], self.out_features)


def _plain_layer(
    mod: QuantConv2d | QuantConvTranspose2d | QuantLinear, w: torch.Tensor, b: torch.Tensor | None
) -> nn.Module:
    if isinstance(mod, (QuantConv2d, QuantConvTranspose2d)):
        transposed = isinstance(mod, QuantConvTranspose2d)
        out = (nn.ConvTranspose2d if transposed else nn.Conv2d)(
            mod.in_channels,
            mod.out_channels,
            mod.kernel_size,
            stride=mod.stride,
            padding=mod.padding,
            dilation=mod.dilation,
            groups=mod.groups,
            bias=b is not None,
            device=w.device,
            dtype=w.dtype,
            **({"output_padding": mod.output_padding} if transposed else {"padding_mode": mod.padding_mode}),
        )
    else:
        # a zero bias where there is none: torch.onnx writes a Linear without bias as MatMul with a transposed
        # copy of the weight, with one as Gemm on the weight itself
        out = RowsLinear(mod.in_features, mod.out_features, True, device=w.device, dtype=w.dtype)
        if b is None:
            b = torch.zeros(mod.out_features, device=w.device, dtype=w.dtype)
    out.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
    if b is not None:
        out.bias = nn.Parameter(b.detach().clone(), requires_grad=False)
    return out
