"""Activation statistics: every quantizer's output against the float model's tensor at the same place.

The float model (traced and converted like the wrapper, see :mod:`.reference`) and the quantized model
run on the same batches; forward hooks on the quantized model's PACT2 modules see each quantizer's input
(for clipping) and output (quantized), and compare the output with the float tensor recorded for that
spot. Sums are accumulated as tensors on the model's device and read once at the end.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from tqdm import tqdm

from ..layers.pact2 import PACT2
from ..quantize.wrapper import QuantBaseModule
from .metrics import cosine, sqnr_db
from .reference import NodeTap

# accumulator slots
F2, E2, FQ, Q2, CLIP, SAT, N, NF = range(8)


class _SpotAccumulator:
    """Sums for one quantizer over all batches."""

    def __init__(self, q: PACT2, device: torch.device):
        scale, qmin, qmax = q.qparams()
        self.lo, self.hi = q.clip_values()
        self.signed = qmin < 0
        s = float(scale)
        self.top = min(qmax * s, float(q.cap)) if q.cap is not None else qmax * s
        self.bottom = qmin * s
        self.half = 0.5 * s
        self.sums = torch.zeros(8, dtype=torch.float64, device=device)
        self.fmin = torch.full((), float("inf"), dtype=torch.float64, device=device)
        self.fmax = torch.full((), float("-inf"), dtype=torch.float64, device=device)

    def add_quant(self, x_in: torch.Tensor, q: torch.Tensor) -> None:
        clipped = x_in > self.hi
        sat = q >= self.top - self.half
        if self.signed:
            clipped |= x_in < self.lo
            sat |= q <= self.bottom + self.half
        self.sums[CLIP] += clipped.sum()
        self.sums[SAT] += sat.sum()
        self.sums[N] += q.numel()

    def add_pair(self, f: torch.Tensor, q: torch.Tensor) -> None:
        f, q = f.double(), q.double()
        self.sums[F2] += f.square().sum()
        self.sums[E2] += (q - f).square().sum()
        self.sums[FQ] += (f * q).sum()
        self.sums[Q2] += q.square().sum()
        self.sums[NF] += f.numel()
        self.fmin = torch.minimum(self.fmin, f.min())
        self.fmax = torch.maximum(self.fmax, f.max())

    def result(self) -> dict[str, Any]:
        v = self.sums.tolist()
        paired = v[NF] > 0
        return {
            "act_sqnr": sqnr_db(v[F2], v[E2]) if paired else None,
            "act_cosine": cosine(v[FQ], v[F2], v[Q2]) if paired else None,
            "float_min": float(self.fmin) if paired else None,
            "float_max": float(self.fmax) if paired else None,
            "clip_lo": self.lo,
            "clip_hi": self.hi,
            "clip_pct": 100.0 * v[CLIP] / max(v[N], 1.0),
            "sat_pct": 100.0 * v[SAT] / max(v[N], 1.0),
        }


def _first_tensor(out: Any) -> torch.Tensor:
    while isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, dict):
        out = next(iter(out.values()))
    return out


@torch.no_grad()
def activation_stats(
    qmodel: QuantBaseModule, float_gm: torch.fx.GraphModule, batches: Iterable[tuple], progress: bool = True
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """({quantizer name: stats}, whole-output stats) over ``batches`` of ``(inputs tuple, labels or None)``.

    The whole-output stats compare the float model's output with the quantized model's: ``output_sqnr``,
    ``agreement`` (% same top-1), and with labels ``acc_float`` / ``acc_quant``.
    """
    quantizers = qmodel.quantizers()
    device = next(iter(qmodel.parameters())).device
    float_of = {s.name: s.tensor for s in qmodel.plan.acts if s.name in quantizers}
    acc = {name: _SpotAccumulator(q, device) for name, q in quantizers.items() if q.observed}
    tap = NodeTap(float_gm, [n for n in float_of.values() if n])
    ref: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(module, inputs, output):
            a = acc[name]
            a.add_quant(inputs[0], output)
            f = ref.get(float_of.get(name) or "")
            if f is not None and f.shape == output.shape:
                a.add_pair(f, output)

        return fn

    handles = [quantizers[n].register_forward_hook(hook(n)) for n in acc]
    out_sums = torch.zeros(6, dtype=torch.float64, device=device)  # f2, e2, agree, correct_f, correct_q, n
    has_labels = False
    try:
        for inputs, labels in tqdm(batches, desc="analysis: activations", disable=not progress, leave=False):
            f_out, ref = tap.capture(*inputs)
            q_out = _first_tensor(qmodel(*inputs))
            f_out = _first_tensor(f_out)
            out_sums[0] += f_out.double().square().sum()
            out_sums[1] += (q_out.double() - f_out.double()).square().sum()
            if q_out.dim() == 2:
                out_sums[2] += (q_out.argmax(1) == f_out.argmax(1)).sum()
                out_sums[5] += q_out.shape[0]
                if labels is not None:
                    has_labels = True
                    out_sums[3] += (f_out.argmax(1) == labels).sum()
                    out_sums[4] += (q_out.argmax(1) == labels).sum()
    finally:
        for h in handles:
            h.remove()
        ref = {}
    v = out_sums.tolist()
    n = max(v[5], 1.0)
    whole = {
        "output_sqnr": sqnr_db(v[0], v[1]),
        "agreement": 100.0 * v[2] / n if v[5] else None,
        "acc_float": 100.0 * v[3] / n if has_labels else None,
        "acc_quant": 100.0 * v[4] / n if has_labels else None,
    }
    return {name: a.result() for name, a in acc.items()}, whole
