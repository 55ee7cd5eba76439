"""QuantCalibrateModule: post-training calibration (PTQ) on the graph machinery of QuantTrainModule."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..layers import PACT2, QuantConv2d, QuantConvTranspose2d, QuantLinear
from ..layers.blocks import AddBlock, CatBlock, MultBlock
from ..quantize.config import QuantConfig
from ..quantize.wrapper import QuantBaseModule
from .bias_correction import InputMean, weight_error_mean
from .observer import HistogramRanges
from .weight_clip import mse_weight_shift

WEIGHT_CLIPPING = (None, "mse")
# modules that read their inputs and change none of them (an AddBlock writes into its first input only when
# that input has no other reader: never one that a layer also reads)
_READERS = (
    QuantConv2d,
    QuantConvTranspose2d,
    QuantLinear,
    AddBlock,
    CatBlock,
    MultBlock,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
)


def _read_only_users(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Every user of ``node`` is the graph's output or a module that only reads it (a quantizer that works out
    of place among them): nothing can change the tensor while the layers reading it run."""
    for user in node.users:
        if user.op == "output":
            continue
        if user.op != "call_module":
            return False
        mod = gm.get_submodule(user.target)
        if not (isinstance(mod, _READERS) or (isinstance(mod, PACT2) and not mod.inplace)):
            return False
    return True


class QuantCalibrateModule(QuantBaseModule):
    """Calibrate a float model for TIDL from unlabeled batches: no training, no state machine.

    Usage::

        q = QuantCalibrateModule(model, dummy_input, method="entropy")  # calibration mode from the start
        with torch.no_grad():
            for x in calibration_batches:
                q(x)                   # the model computes in float, histograms count
        q.eval()                       # ranges chosen, weights clipped, biases corrected: TIDL's numerics

    The wrapper is in calibration mode from construction (whatever mode the float model is in; ``train()``
    there changes nothing) until ``eval()``, which calls :meth:`end_calibration`; there is no counting of
    forward calls. Calling ``train()`` again and feeding more batches continues the same histograms.
    While calibrating, the model's own modules run in eval mode (Dropout, StochasticDepth and the like are
    off: the histograms and means are those of inference); BatchNorm is never updated (it is folded with its
    running statistics).

    Args:
        method: activation ranges by ``"max"``, ``"percentile"``, ``"mse"`` or ``"entropy"`` (KL, TensorRT);
            see :mod:`xnnq.calibrate.methods`. With power-of-2 ranges (default) the method chooses among
            powers of two by its objective.
        percentile: for ``method="percentile"``, in percent.
        bias_correction: subtract each layer's own weight-quantization error of the per-channel output
            mean (see :mod:`xnnq.calibrate.bias_correction`).
        weight_clipping: ``None`` (max rule) or ``"mse"``: halve a layer's power-of-2 weight range up to
            twice when that lowers the weights' squared error (per channel for per-channel layers).
        bitwidth_overrides: ``{"layer name or glob": 16, "first": 16, "last": 16}``: weights and the
            activation after the layer (activation quantizers can also be named directly); these are the
            layers the export lists for TIDL's 16-bit options.
        bins, max_bins, sample_size: histogram resolution and per-batch sample (see
            :class:`~xnnq.calibrate.histogram.Histogram`).
        config, leaf_modules, verbose, **settings: as :class:`~xnnq.quantize.wrapper.QuantBaseModule`; the
            settings are :class:`~xnnq.quantize.config.QuantConfig`'s fields (``bitwidth_weights``,
            ``bitwidth_activations``, ``per_channel_q`` — e.g. ``"depthwise"`` —, ``power2_weight_range``,
            ``power2_activation_range``, ``target`` (a TIDL chip whose numerics the unset ones follow), ``constrain_weights``, ``trim_fraction`` (here: the negative fraction
            above which an activation of unknown sign is signed), ``clip_ranges``).
    """

    def __init__(
        self,
        model: nn.Module,
        dummy_input: Any,
        config: QuantConfig | None = None,
        *,
        method: str = "mse",
        percentile: float = 99.99,
        bias_correction: bool = True,
        weight_clipping: str | None = None,
        bins: int = 2048,
        max_bins: int = 1 << 16,
        sample_size: int = 1 << 16,
        leaf_modules: Iterable[str | type] = (),
        verbose: bool = False,
        **settings: Any,
    ):
        if weight_clipping not in WEIGHT_CLIPPING:
            raise ValueError(
                f"QuantCalibrateModule: weight_clipping must be None or 'mse', got {weight_clipping!r}"
            )
        if "activation_observer" in settings:
            raise TypeError(
                "QuantCalibrateModule observes activations with histograms; choose the range with "
                "method= (and percentile=, bins=...), not activation_observer="
            )
        if settings.get("range_learning", "statistics") != "statistics" or (
            config is not None and config.range_learning != "statistics"
        ):
            raise ValueError(
                "QuantCalibrateModule does not train, so it cannot learn ranges: use "
                "range_learning='statistics' here (learned thresholds are for QuantTrainModule)"
            )
        ranges = HistogramRanges(method, percentile, bins, max_bins, sample_size)
        config = QuantConfig.from_settings(config, **settings, activation_observer=ranges)
        super().__init__(model, dummy_input, config, leaf_modules=leaf_modules, verbose=verbose)
        self.method, self.percentile = method, percentile
        self.use_bias_correction, self.weight_clipping = bias_correction, weight_clipping
        self.bn_frozen = True
        self.input_means = nn.ModuleDict()
        if bias_correction:
            self._add_input_means()
        self._weight_quant_saved: dict[str, bool] | None = None
        self.train()  # calibrating from construction, whatever mode the float model was in

    def _add_input_means(self) -> None:
        """An :class:`InputMean` for each layer whose bias is corrected; layers reading the same tensor share one
        (the tensor is summed once per batch) when nothing can change that tensor between them: every reader
        is a module that only reads its inputs."""
        gm = self.module
        calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
        node_of = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
        shared: dict[fx.Node, InputMean] = {}
        for spot in self.plan.weights:
            layer = gm.get_submodule(spot.name)
            if getattr(layer, "bias", None) is None and spot.bn is None:
                continue  # no bias after folding: nothing to correct
            node = node_of.get(spot.name)
            src = node.args[0] if node is not None and node.args else None
            share = calls[spot.name] == 1 and isinstance(src, fx.Node) and _read_only_users(gm, src)
            rec = shared.get(src) if share else None
            if rec is None:
                rec = InputMean()
                if share:
                    shared[src] = rec
            self.input_means[spot.name.replace(".", "/")] = rec
            layer.register_forward_pre_hook(rec.hook)
        if self.input_means:
            gm.register_forward_pre_hook(self._new_batch)

    def _new_batch(self, module: nn.Module, args: tuple) -> None:
        if not self.calibrating:  # the means count only while calibrating
            return
        for rec in self.input_means.values():
            rec.new_batch()

    # ------------------------------------------------------------------------------------ modes
    def _layers(self):
        for spot in self.plan.weights:
            yield (
                spot,
                self.module.get_submodule(spot.name),
                (self.module.get_submodule(spot.bn) if spot.bn else None),
            )

    @property
    def calibrating(self) -> bool:
        """True from construction or ``train()`` until the next ``eval()`` / :meth:`end_calibration`."""
        return self._weight_quant_saved is not None

    def train(self, mode: bool = True):
        """``train()``: calibration mode (float forward, histograms count). ``eval()``: :meth:`end_calibration`,
        then TIDL's numerics."""
        super().train(mode)
        if mode:
            # the model runs as it infers (dropout, stochastic depth and any other training-only behaviour
            # off: the ranges and means are those of inference); only the quantizers observe
            self.module.train(False)
            for q in self.quantizers().values():
                q.train(True)
        if mode and not self.calibrating:
            self._weight_quant_saved = {}
            for spot, layer, _ in self._layers():
                self._weight_quant_saved[spot.name] = layer.quant_enabled
                layer.quant_enabled = False
                layer.forget_float_weight_bias()  # folded once per session (weights may have changed since)
        elif not mode and self.calibrating:
            self.end_calibration()
        return self

    # ------------------------------------------------------------------------ end of calibration
    @torch.no_grad()
    def end_calibration(self) -> dict[str, Any]:
        """Choose every activation range, then weight clipping and bias correction; returns what was set.

        Quantizers that saw no data are left unobserved (their forward raises a clear error). Without any
        calibration data (e.g. a calibrated state dict was loaded instead) weights and biases are left as they are.
        """
        mean_of = {id(rec): rec.mean() for rec in self.input_means.values()}  # once per shared mean
        means = {key: mean_of[id(rec)] for key, rec in self.input_means.items()}
        for key, mean in means.items():  # before anything is changed: the module stays calibrating
            if mean is not None and not bool(torch.isfinite(mean).all()):
                raise FloatingPointError(
                    f"{key.replace('/', '.')}: its calibration input held NaN or Inf (seen by bias correction's "
                    "input mean). Check the calibration data and the model (run it in float first)."
                )
        saved = self._weight_quant_saved or {}
        self._weight_quant_saved = None
        ranges = {n: q.settle_range() for n, q in self.quantizers().items()}
        seen = any(r is not None for r in ranges.values()) or any(
            int(m.count) for m in self.input_means.values()
        )
        shifts, corrections = {}, {}
        for spot, layer, bn in self._layers():
            layer.quant_enabled = saved.get(spot.name, layer.quant_enabled)
            layer.forget_float_weight_bias()
            if not seen:
                continue
            if self.weight_clipping == "mse":
                layer.weight_range_shift.copy_(mse_weight_shift(layer, bn))
                shifts[spot.name] = layer.weight_range_shift.tolist()
            if self.use_bias_correction:
                mean = means.get(spot.name.replace(".", "/"))
                corr = weight_error_mean(layer, mean, bn) if mean is not None else None
                layer.bias_correction.copy_(
                    corr if corr is not None else torch.zeros_like(layer.bias_correction)
                )
                corrections[spot.name] = None if corr is None else float(corr.abs().max())
        self.calibration_report = {
            "ranges": ranges,
            "weight_range_shift": shifts,
            "bias_correction_max_abs": corrections,
        }
        return self.calibration_report

    def finalize(self) -> dict[str, Any]:
        """Deprecated name of :meth:`end_calibration`."""
        warnings.warn(
            "QuantCalibrateModule.finalize() is deprecated; use end_calibration() (or eval())",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.end_calibration()
