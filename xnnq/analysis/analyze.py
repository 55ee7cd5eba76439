"""``analyze(qmodel, float_model, batches)``: per-layer quantization statistics, ranked by sensitivity."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..quantize.wrapper import QuantBaseModule
from .activations import activation_stats
from .result import AnalysisResult, LayerStats
from .sensitivity import layer_units
from .sensitivity import sensitivity as sensitivity_pass
from .weights import weight_stats


def _as_pairs(
    batches: Iterable[Any], device: torch.device
) -> list[tuple[tuple[torch.Tensor, ...], torch.Tensor | None]]:
    """Batches given as ``x``, ``(x, y)`` or ``((x1, x2), y)`` → ``[(inputs tuple, labels or None)]``."""
    pairs = []
    for b in batches:
        if isinstance(b, torch.Tensor):
            x, y = (b,), None
        elif isinstance(b, (tuple, list)) and len(b) == 2:
            x, y = b
            x = tuple(x) if isinstance(x, (tuple, list)) else (x,)
        else:
            raise TypeError(
                f"analyze: each batch must be a tensor or an (inputs, labels) pair, got {type(b).__name__}"
            )
        pairs.append((tuple(t.to(device) for t in x), y.to(device) if isinstance(y, torch.Tensor) else None))
    if not pairs:
        raise ValueError(
            "analyze: `batches` is empty; pass a few batches of real inputs (e.g. 4 x 32 images)"
        )
    return pairs


def analyze(
    qmodel: QuantBaseModule,
    float_model: nn.Module,
    batches: Iterable[Any],
    *,
    sensitivity: bool = True,
    sensitivity_batches: int = 4,
    js_bins: int = 512,
    leaf_modules: Iterable[str | type] | None = None,
    progress: bool = True,
) -> AnalysisResult:
    """Per-layer quantization analysis of ``qmodel`` (an xnnq wrapper with observed ranges) against ``float_model``.

    Args:
        qmodel: a QuantTrainModule / QuantTestModule (after QAT or calibration). Run in eval mode; its
            ranges, flags and mode are left as they were.
        float_model: the float model it was built from (same architecture; module paths as in ``qmodel``).
        batches: an iterable of input tensors or ``(inputs, labels)`` pairs; all are used for the
            weight/activation statistics, the first ``sensitivity_batches`` for the sensitivity passes.
        sensitivity: run one pass per layer with only that layer quantized (see :mod:`.sensitivity`).
        js_bins: bins of the weight histograms for the JS divergence.
        leaf_modules: deprecated and ignored: the float model is traced as the wrapper traced it.
        progress: show tqdm progress bars.

    Returns an :class:`AnalysisResult` (``to_markdown()``, ``to_json()``); layers are ranked by ``sens_noise``
    (most sensitive first), or by weight SQNR when ``sensitivity=False``.
    """
    if leaf_modules is not None:
        warnings.warn(
            "analyze(leaf_modules=...) is deprecated and ignored: the float model is traced with the "
            "wrapper's own leaf_modules",
            DeprecationWarning,
            stacklevel=2,
        )
    if not isinstance(qmodel, QuantBaseModule):
        raise TypeError(
            f"analyze: qmodel must be an xnnq wrapper (QuantTrainModule/QuantTestModule), got "
            f"{type(qmodel).__name__}. Wrap the float model first: xnnq.QuantTrainModule(model, dummy_input)."
        )
    unobserved = [n for n, q in qmodel.quantizers().items() if not q.observed]
    if unobserved:
        raise RuntimeError(
            f"analyze: activation quantizers {unobserved[:5]} have no range yet. Calibrate "
            "(forward passes in training mode) or train the model before analysing it."
        )
    device = next(iter(qmodel.parameters())).device
    pairs = _as_pairs(batches, device)
    n_inputs = len(qmodel.dummy_shapes)
    if any(len(x) != n_inputs for x, _ in pairs):
        raise ValueError(
            f"analyze: the model takes {n_inputs} input(s), a batch gives {len(pairs[0][0])}; give each batch "
            "as a tensor, an (input, labels) pair, or ((input_1, ..., input_n), labels) for several inputs"
        )
    was_training = qmodel.training
    qmodel.eval()
    try:
        fgm = qmodel.float_reference(float_model)
        w_stats = weight_stats(qmodel, js_bins)
        a_stats, whole = activation_stats(qmodel, fgm, pairs, progress)
        units = layer_units(qmodel)
        sens: dict[str, dict[str, Any]] = {}
        total: dict[str, Any] = {}
        sens_inputs = [x for x, _ in pairs[: max(1, sensitivity_batches)]]
        if sensitivity:
            sens, total = sensitivity_pass(qmodel, units, sens_inputs, progress)
    finally:
        qmodel.train(was_training)

    quantizers = qmodel.quantizers()
    layers = []
    for u in units:
        row = LayerStats(u.name, u.kind, u.index, list(u.quantizers))
        if u.weight:
            row.__dict__.update(w_stats[u.weight])
        spots = [a_stats[q] for q in u.quantizers if q in a_stats]
        if spots:
            worst = min(spots, key=lambda s: s["act_sqnr"] if s["act_sqnr"] is not None else math.inf)
            row.__dict__.update(worst)
            row.act_bits = max(quantizers[q].bits for q in u.quantizers)
        row.__dict__.update(sens.get(u.name, {}))
        layers.append(row)
    key = (
        (lambda s: -(s.sens_noise or 0.0))
        if sensitivity
        else (lambda s: s.weight_sqnr if s.weight_sqnr is not None else math.inf)
    )
    for rank, row in enumerate(sorted(layers, key=key), 1):
        row.rank = rank
    summary = {
        "samples": sum(int(x[0].shape[0]) for x, _ in pairs),
        **whole,
        "sensitivity_samples": sum(int(x[0].shape[0]) for x in sens_inputs) if sensitivity else 0,
        "output_sqnr_all_quantized_vs_quant_off": total.get("sens_sqnr"),
        "agreement_all_quantized_vs_quant_off": total.get("sens_agree"),
        "noise_all_quantized_vs_quant_off": total.get("sens_noise"),
    }
    return AnalysisResult(layers, summary)
