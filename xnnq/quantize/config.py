"""QuantConfig: every setting that decides how a wrapper quantizes, as one value.

The wrappers' keyword arguments (``bitwidth_weights=...``) build it; ``make_plan`` and ``build`` read
it instead of a dozen threaded keyword arguments. Settings that are not about quantization (which
submodules stay opaque to tracing, verbosity) stay keyword arguments of the wrappers.

Adding a setting: a field here with its default and check in ``__post_init__``, and the stage that
reads it (the plan for what a tensor's quantizer is, the build for how its modules are made). Planned:

* ``target``: the TIDL device ("TDA4VM", "AM69A", ...): a table of per-chip facts that sets the
  defaults of the numeric fields below and is read by the plan (what is allowed) and the export
  (options JSON).
* ``range_learning``: how activation ranges are learned in QAT (learned thresholds): read by the
  build when it makes each PACT2, next to ``activation_observer`` (which would initialize them).
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

if TYPE_CHECKING:
    from .plan import ActSpot

PER_CHANNEL_Q = (False, "depthwise", "all", True)  # True is accepted as "all"


class ObserverFactory(Protocol):
    """Makes the observer of one activation quantizer (``QuantConfig.activation_observer``)."""

    def __call__(self, spot: ActSpot, config: QuantConfig) -> RangeObserver: ...


@dataclass(frozen=True)
class TrackedRanges:
    """QAT: each quantizer's range is a running tail-trimmed range (:class:`~xnnq.layers.RangeTracker`)."""

    def __call__(self, spot: ActSpot, config: QuantConfig) -> RangeObserver:
        return RangeTracker(tail=config.trim_fraction, ema_alpha=config.ema_alpha, track_min=spot.signed is not False)


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

    def __post_init__(self) -> None:
        check_bits(self.bitwidth_weights, "bitwidth_weights")
        check_bits(self.bitwidth_activations, "bitwidth_activations")
        if self.per_channel_q not in PER_CHANNEL_Q:
            raise ValueError(f"per_channel_q must be False, 'depthwise' or 'all', got {self.per_channel_q!r}")
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ValueError(f"trim_fraction must be in [0, 0.5), got {self.trim_fraction}")
        if not 0.0 < self.ema_alpha <= 1.0:
            raise ValueError(f"ema_alpha must be in (0, 1], got {self.ema_alpha}")
        # None (the wrappers' old default) means "none"; copies, so the caller's dicts can change freely
        object.__setattr__(self, "bitwidth_overrides", dict(self.bitwidth_overrides or {}))
        object.__setattr__(self, "clip_ranges", dict(self.clip_ranges or {}))

    @property
    def per_channel_all(self) -> bool:
        return self.per_channel_q in ("all", True)

    @classmethod
    def from_settings(cls, config: QuantConfig | None = None, **settings: Any) -> QuantConfig:
        """``config`` (or the defaults) with ``settings`` (field names) replacing its fields.

        ``histogram_tail`` is accepted as the deprecated name of ``trim_fraction``.
        """
        if "histogram_tail" in settings:
            warnings.warn("histogram_tail is deprecated; it is the trim fraction: use trim_fraction=",
                          DeprecationWarning, stacklevel=3)
            if "trim_fraction" in settings:
                raise TypeError("give trim_fraction or its deprecated name histogram_tail, not both")
            settings["trim_fraction"] = settings.pop("histogram_tail")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise TypeError(f"unknown quantization setting(s) {', '.join(unknown)}; the settings are "
                            f"{', '.join(sorted(names))} (see xnnq.quantize.QuantConfig)")
        base = config if config is not None else cls()
        return dataclasses.replace(base, **settings) if settings else base
