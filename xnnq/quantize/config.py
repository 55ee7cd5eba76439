"""QuantConfig: every setting that decides how a wrapper quantizes, as one value.

The wrappers' keyword arguments (``bitwidth_weights=...``) build it; ``make_plan`` and ``build`` read
it instead of a dozen threaded keyword arguments. Settings that are not about quantization (which
submodules stay opaque to tracing, verbosity) stay keyword arguments of the wrappers.

Adding a setting: a field here with its default and check in ``__post_init__``, and the stage that
reads it (the plan for what a tensor's quantizer is, the build for how its modules are made).

``range_learning`` (statistics or learned power-of-2 thresholds) is read by the build: with ``"tqt"`` it
gives each PACT2 and each conv/linear a :class:`~xnnq.layers.tqt.LearnedRange`, initialised from the
observer's range (activations) or the max rule (weights) over the first ``range_init_batches`` batches, and
moving with their power of two after that (``range_anchor="statistics"``) or not (``"init"``).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..layers.fake_quant import check_bits
from ..layers.observer import RangeObserver
from ..layers.range_tracker import RangeTracker
from ..layers.rounding import DEFAULT as DEFAULT_ROUNDING
from ..layers.rounding import as_rounding
from ..layers.tqt import ANCHORS
from ..targets import NUMERIC_KEYS, resolve_numerics

if TYPE_CHECKING:
    from .plan import ActSpot

PER_CHANNEL_Q = (False, "depthwise", "all", True)  # True is accepted as "all"
RANGE_LEARNING = ("statistics", "tqt", "tqt-activations")
SILU_MODES = ("fused", "sigmoid_mul")


class ObserverFactory(Protocol):
    """Makes the observer of one activation quantizer (``QuantConfig.activation_observer``)."""

    def __call__(self, spot: ActSpot, config: QuantConfig) -> RangeObserver: ...


@dataclass(frozen=True)
class TrackedRanges:
    """QAT: each quantizer's range is a running tail-trimmed range (:class:`~xnnq.layers.RangeTracker`)."""

    def __call__(self, spot: ActSpot, config: QuantConfig) -> RangeObserver:
        return RangeTracker(
            tail=config.trim_fraction, ema_alpha=config.ema_alpha, track_min=spot.signed is not False
        )


@dataclass(frozen=True)
class QuantConfig:
    """How a model is quantized (see the module docstring for how to extend it).

    Attributes:
        bitwidth_weights, bitwidth_activations: 8 or 16.
        per_channel_q: weight scales per output channel: ``False``, ``"depthwise"`` or ``"all"``.
        power2_weight_range, power2_activation_range: power-of-2 scales (TIDL's default) or not.
        constrain_weights: clip isolated weight outliers before the weight scale is chosen.
        bitwidth_overrides: ``{"layer name or glob": 16}``; the keys ``"first"``/``"last"`` name the first
            and last weight layer; activation quantizers can be named directly.
        clip_ranges: ``{quantizer name: fixed range}``: those ranges are never estimated.
        trim_fraction: fraction of the values ignored on each side when a range is estimated from data
            (``1e-4`` = 0.01 %); calibration uses it as the share of negative values above which a quantizer
            of unknown sign is signed.
        ema_alpha: weight of a new batch in the running range of QAT once the first ``1/ema_alpha``
            batches (a cumulative mean) are over.
        activation_observer: makes the observer that sets each activation quantizer's range from data:
            :class:`TrackedRanges` (QAT, default) or :class:`~xnnq.calibrate.HistogramRanges` (calibration,
            set by ``QuantCalibrateModule``).
        target: a TIDL chip ("TDA4VM", "AM69A", ... see :mod:`xnnq.targets`): the numeric settings not given
            explicitly follow the chip; explicit ones it cannot run are refused. ``None``: today's defaults.
        rounding: how activation codes are rounded (:mod:`xnnq.layers.rounding`): ``"half_even"`` (default,
            onnxruntime's), ``"tidl"`` (TIDL's rule: half up, half away from zero at the network input,
            floor after a linear resize), ``"half_up"``, ``"half_away"``, ``"floor"``.
        range_learning: ``"statistics"`` (default: every range follows the data as observed, weights by the
            max rule) or ``"tqt"``: learned power-of-2 thresholds (:mod:`xnnq.layers.tqt`, Jain et al. 2019)
            for activations and weights (per channel where the plan quantizes per channel);
            ``"tqt-activations"`` learns the activation thresholds only. Train ``qmodel.range_parameters()``
            as their own parameter group (see the README).
        range_init_batches: with learned thresholds, the number of first training batches whose statistics
            set them (activations: the observer's running range; weights: the max rule); learned from then on.
        silu: how a SiLU (``x · σ(x)``) is quantized: ``"fused"`` (default: one quantizer on its output) or
            ``"sigmoid_mul"`` (a quantizer on ``σ(x)`` too, as TIDL computes it: ONNX up to opset 19, TIDL's, has
            no SiLU op, so TIDL runs a Sigmoid layer and a Mul layer, each with a fixed-point output
            [tidl-ops]; the QDQ file then scales every layer, at the cost of two more passes per SiLU in QAT).
        range_anchor: with learned thresholds, ``"statistics"`` (default): the statistics keep running until
            the ranges freeze and a threshold moves by whole octaves with their power of two, so what is learned
            is an offset from it (exactly statistics QAT while no offset reaches half an octave); ``"init"``:
            the statistics set the thresholds during ``range_init_batches`` only (the paper's TQT).
        range_hysteresis: with learned thresholds, how far (octaves, ``[0, 0.5]``) a threshold must go past the
            boundary of its power of two before the next one is in force (:class:`~xnnq.layers.tqt.LearnedRange`);
            0 is the paper's ``ceil``.
    """

    bitwidth_weights: int = 8
    bitwidth_activations: int = 8
    per_channel_q: bool | str = False
    power2_weight_range: bool = True
    power2_activation_range: bool = True
    constrain_weights: bool = True
    bitwidth_overrides: Mapping[str, int] = field(default_factory=dict)
    clip_ranges: Mapping[str, float] = field(default_factory=dict)
    trim_fraction: float = 1e-4
    ema_alpha: float = 0.01
    activation_observer: ObserverFactory = TrackedRanges()
    target: str | None = None
    rounding: str = DEFAULT_ROUNDING.value
    range_learning: str = "statistics"
    range_init_batches: int = 20
    range_anchor: str = "statistics"
    range_hysteresis: float = 0.25
    silu: str = "fused"

    def __post_init__(self) -> None:
        check_bits(self.bitwidth_weights, "bitwidth_weights")
        check_bits(self.bitwidth_activations, "bitwidth_activations")
        if self.per_channel_q not in PER_CHANNEL_Q:
            raise ValueError(f"per_channel_q must be False, 'depthwise' or 'all', got {self.per_channel_q!r}")
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {self.trim_fraction}")
        if not 0.0 < self.ema_alpha <= 1.0:
            raise ValueError(f"ema_alpha must be in (0, 1], got {self.ema_alpha}")
        object.__setattr__(self, "rounding", as_rounding(self.rounding).value)
        if self.range_learning not in RANGE_LEARNING:
            raise ValueError(
                f"range_learning must be one of {', '.join(map(repr, RANGE_LEARNING))}, got "
                f"{self.range_learning!r}"
            )
        power2 = self.power2_activation_range and self.power2_weight_range
        if self.range_learning != "statistics" and not power2:
            chip = (
                f" ({self.target}'s default numerics use free scales: pass power2_activation_range=True and "
                "power2_weight_range=True, which it also runs)"
                if self.target is not None
                else ""
            )
            raise ValueError(
                f"range_learning={self.range_learning!r} learns power-of-2 thresholds; it cannot "
                f"be combined with power2_activation_range=False or power2_weight_range=False{chip}"
            )
        if self.range_anchor not in ANCHORS:
            raise ValueError(
                f"range_anchor must be one of {', '.join(map(repr, ANCHORS))}, got {self.range_anchor!r}"
            )
        if not 0.0 <= self.range_hysteresis <= 0.5:
            raise ValueError(f"range_hysteresis must be in [0, 0.5] octaves, got {self.range_hysteresis}")
        if self.silu not in SILU_MODES:
            raise ValueError(f"silu must be one of {', '.join(map(repr, SILU_MODES))}, got {self.silu!r}")
        if self.range_init_batches < 1:
            raise ValueError(f"range_init_batches must be >= 1, got {self.range_init_batches}")
        # None (the wrappers' old default) means "none"; copies, so the caller's dicts can change freely
        object.__setattr__(self, "bitwidth_overrides", dict(self.bitwidth_overrides or {}))
        object.__setattr__(self, "clip_ranges", dict(self.clip_ranges or {}))

    @property
    def split_silu(self) -> bool:
        """Whether a SiLU is quantized as TIDL computes it, ``σ(x)`` quantized before the product."""
        return self.silu == "sigmoid_mul"

    @property
    def per_channel_all(self) -> bool:
        return self.per_channel_q in ("all", True)

    @property
    def learn_activation_ranges(self) -> bool:
        return self.range_learning in ("tqt", "tqt-activations")

    @property
    def learn_weight_ranges(self) -> bool:
        return self.range_learning == "tqt"

    @classmethod
    def from_settings(cls, config: QuantConfig | None = None, **settings: Any) -> QuantConfig:
        """``config`` (or the defaults) with ``settings`` (field names) replacing its fields.

        ``histogram_tail`` is accepted as the deprecated name of ``trim_fraction``.
        """
        if "histogram_tail" in settings:
            warnings.warn(
                "histogram_tail is deprecated; it is the trim fraction: use trim_fraction=",
                DeprecationWarning,
                stacklevel=3,
            )
            if "trim_fraction" in settings:
                raise TypeError("give trim_fraction or its deprecated name histogram_tail, not both")
            settings["trim_fraction"] = settings.pop("histogram_tail")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise TypeError(
                f"unknown quantization setting(s) {', '.join(unknown)}; the settings are "
                f"{', '.join(sorted(names))} (see xnnq.quantize.QuantConfig)"
            )
        base = config if config is not None else cls()
        target = settings.get("target", base.target)
        if target is not None:  # numerics not given follow the chip; explicit ones are checked against it
            given = {
                k: settings.get(k, getattr(base, k) if config is not None else None) for k in NUMERIC_KEYS
            }
            num = resolve_numerics(target, **given)
            settings.update({k: num[k] for k in NUMERIC_KEYS}, target=num["target"])
        return dataclasses.replace(base, **settings) if settings else base
