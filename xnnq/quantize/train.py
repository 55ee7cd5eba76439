"""QuantTrainModule: quantization-aware training."""

from __future__ import annotations

from .wrapper import QuantBaseModule


class QuantTrainModule(QuantBaseModule):
    """Wrap a float model for quantization-aware training (QAT) for TIDL.

    ``qmodel = QuantTrainModule(model, dummy_input)``; train as usual (ranges are tracked in training mode,
    weights trained through the straight-through estimator); part-way through call
    ``xnnq.utils.freeze_bn(qmodel)`` and ``xnnq.layers.freeze_quant_range(qmodel)``; ``qmodel.eval()`` then
    computes what TIDL computes.

    Settings: a :class:`~xnnq.quantize.config.QuantConfig` as ``config``, or its fields as keyword
    arguments: ``bitwidth_weights``/``bitwidth_activations`` (8 or 16), ``per_channel_q`` (False,
    "depthwise" or "all"), ``power2_weight_range``/``power2_activation_range`` (default True: TIDL),
    ``target`` (a TIDL chip, e.g. ``"AM69A"``: the three settings before it default to the chip's numerics,
    settings it cannot run are refused; see ``xnnq/targets.py``),
    ``constrain_weights`` (clip weight outliers, default True), ``bitwidth_overrides``
    (``{"layer or glob": 16}``, ``"first"``/``"last"``), ``trim_fraction`` (fraction trimmed each side of
    a range, 1e-4; ``histogram_tail`` is its deprecated name), ``ema_alpha``, ``clip_ranges``
    (``{quantizer name: fixed range}``), ``range_learning`` (``"statistics"``, default: ranges follow the
    data; ``"tqt"``: learned power-of-2 thresholds for activations and weights, ``"tqt-activations"``: for
    activations only — train ``qmodel.range_parameters()`` with their own optimizer, e.g. Adam lr 1e-2, and
    the rest, ``qmodel.non_range_parameters()``, as usual; see :mod:`xnnq.layers.tqt`),
    ``range_init_batches`` (batches whose statistics initialise learned thresholds, 20), ``range_anchor``
    (``"statistics"``, default: learned thresholds move with the statistics' power of two until the ranges
    freeze, learning an offset from it; ``"init"``: set from them during initialisation only),
    ``range_hysteresis`` (octaves a learned threshold must go past the edge of its power of two before the
    next one is in force, 0.25; 0: the paper's ``ceil``). Also
    ``leaf_modules`` (submodules kept opaque) and ``verbose`` (print the surgery report).
    """
