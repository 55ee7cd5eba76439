"""Sensitivity: the network output when only one layer is quantized.

Every quantizer is switched off (:func:`xnnq.layers.set_quant_enabled`; the model then computes its float
function with its own weights), the reference outputs are recorded on a few batches, and then, one layer
at a time, only that layer's modules (its conv/linear weights and its output quantizer(s)) are switched on
for one pass over the same batches. The flags are restored afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..layers.freeze import set_quant_enabled
from ..quantize.wrapper import QuantBaseModule
from .activations import _first_tensor
from .metrics import sqnr_db


@dataclass
class Unit:
    """A layer as the analysis sees it: its name and the modules quantizing it."""

    name: str
    kind: str
    index: int
    weight: str | None
    quantizers: list[str]


def layer_units(qmodel: QuantBaseModule) -> list[Unit]:
    """One unit per weight layer (with the activation quantizers whose ``layer`` it is) and per other
    activation-producing layer, in network order."""
    gm, plan = qmodel.module, qmodel.plan
    quantizers = qmodel.quantizers()
    order = {}
    for i, n in enumerate(gm.graph.nodes):
        if n.op == "call_module":
            order.setdefault(n.target, i)
    units: dict[str, Unit] = {}
    for w in plan.weights:
        units[w.name] = Unit(w.name, w.kind, order.get(w.name, 0), w.name, [])
    for a in plan.acts:
        if a.name not in quantizers:
            continue
        if a.layer not in units:
            mods = dict(gm.named_modules())
            kind = type(mods[a.layer]).__name__ if a.layer in mods else a.reason
            units[a.layer] = Unit(a.layer, kind, order.get(a.name, 0), None, [])
        u = units[a.layer]
        u.quantizers.append(a.name)
        if u.weight is None:
            u.index = min(u.index, order.get(a.name, u.index))
    return sorted(units.values(), key=lambda u: u.index)


def _output_error(outs: Sequence[torch.Tensor], refs: Sequence[torch.Tensor]) -> dict[str, Any]:
    sums = torch.zeros(5, dtype=torch.float64, device=refs[0].device)  # f2, e2, kl, agree, n
    for o, r in zip(outs, refs):
        o, r = o.double(), r.double()
        sums[0] += r.square().sum()
        sums[1] += (o - r).square().sum()
        if r.dim() == 2:
            sums[2] += F.kl_div(F.log_softmax(o, 1), F.log_softmax(r, 1), reduction="sum", log_target=True)
            sums[3] += (o.argmax(1) == r.argmax(1)).sum()
            sums[4] += r.shape[0]
    f2, e2, kl, agree, n = sums.tolist()
    return {
        "sens_noise": e2 / f2 if f2 > 0 else None,
        "sens_sqnr": sqnr_db(f2, e2),
        "sens_kl": kl / n if n else None,
        "sens_agree": 100.0 * agree / n if n else None,
    }


@torch.no_grad()
def sensitivity(
    qmodel: QuantBaseModule,
    units: list[Unit],
    inputs: Sequence[tuple[torch.Tensor, ...]],
    progress: bool = True,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """({unit name: output error with only that unit quantized}, output error with everything quantized)."""
    gm = qmodel.module
    flags = {m: m.quant_enabled for m in gm.modules() if hasattr(m, "quant_enabled")}

    def run() -> list[torch.Tensor]:
        return [_first_tensor(qmodel(*x)) for x in inputs]

    def switch(unit: Unit, on: bool) -> None:
        names = ([unit.weight] if unit.weight else []) + unit.quantizers
        for n in names:
            m: nn.Module = gm.get_submodule(n)
            m.quant_enabled = on and flags.get(m, True)

    out: dict[str, dict[str, Any]] = {}
    try:
        set_quant_enabled(qmodel, False)
        refs = run()
        for u in tqdm(units, desc="analysis: sensitivity", disable=not progress, leave=False):
            switch(u, True)
            out[u.name] = _output_error(run(), refs)
            switch(u, False)
        for m, f in flags.items():
            m.quant_enabled = f
        total = _output_error(run(), refs)
    finally:
        for m, f in flags.items():
            m.quant_enabled = f
    return out, total
