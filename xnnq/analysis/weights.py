"""Weight statistics per conv/linear layer: the deployed (folded, quantized) weights against the float ones."""

from __future__ import annotations

from typing import Any

import torch

from ..quantize.wrapper import QuantBaseModule
from .metrics import sqnr, weight_js
from .schemes import SCHEMES, quantize_scheme


@torch.no_grad()
def folded_weights(qmodel: QuantBaseModule, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(float folded weight, quantized folded weight) of weight layer ``name``, as the export computes them."""
    spot = next((w for w in qmodel.plan.weights if w.name == name), None)
    if spot is None:
        raise KeyError(
            f"{name!r} is not a quantized weight layer; weight layers: "
            f"{', '.join(w.name for w in qmodel.plan.weights)}"
        )
    layer = qmodel.module.get_submodule(name)
    bn = qmodel.module.get_submodule(spot.bn) if spot.bn else None
    w, _ = layer.folded_weight_bias(bn)
    wq, _ = layer.quantize_weight(w)
    return w.detach(), wq.detach()


@torch.no_grad()
def weight_stats(qmodel: QuantBaseModule, js_bins: int = 512) -> dict[str, dict[str, Any]]:
    """Per weight layer: ``weight_sqnr`` (dB), ``weight_js``, ``weight_clip_pct`` and ``scheme_sqnr`` {INT, POT, FLOAT}.

    The float tensor is the folded weight (BatchNorm running statistics folded in); the quantized one is
    what inference and the export use (after outlier clipping, on the layer's grid). The schemes quantize
    the same clipped tensor at the layer's bitwidth and granularity (``INT`` on the deployed grid, with the
    layer's ``weight_range_shift``), and are measured against the same float tensor, so ``INT`` equals
    ``weight_sqnr``. ``weight_clip_pct``: % of the weights changed by the
    outlier clipping (``constrain_weights``, ±15σ); when it is not 0 and every scheme has a low SQNR, the
    error is the clipping, not the bitwidth (16 bits will not help; ``constrain_weights=False`` may).
    """
    out: dict[str, dict[str, Any]] = {}
    for spot in qmodel.plan.weights:
        layer = qmodel.module.get_submodule(spot.name)
        w, wq = folded_weights(qmodel, spot.name)
        wc = layer.constrain(w)
        schemes = {
            s: sqnr(
                w,
                quantize_scheme(
                    wc, s, layer.weight_bits, layer.weight_axis(), layer.power2, layer.weight_range_shift
                ),
            )
            for s in SCHEMES
        }
        out[spot.name] = {
            "weight_sqnr": sqnr(w, wq),
            "weight_js": weight_js(w, wq, js_bins),
            "weight_clip_pct": 100.0 * float((wc != w).double().mean()),
            "scheme_sqnr": schemes,
            "weight_bits": layer.weight_bits,
        }
    return out
