"""PACT2: the activation quantizer that replaces ReLU/ReLU6 and follows every range-changing op."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from . import cpu_kernels
from .fake_quant import MIN_RANGE, activation_scale, check_bits, fake_quantize, grid_levels, quant_bounds
from .fused import c_kernels_ready, fake_quantize_activation
from .hooks import unhooked
from .observer import RangeObserver
from .range_tracker import RangeTracker
from .rounding import DEFAULT, Rounding, Site, as_rounding, resolve
from .tqt import LearnedRange


class PACT2(nn.Module):
    """Clip and fake-quantize an activation to a (power-of-2) range set from the data by an observer.

    Args:
        bits: 8 or 16.
        signed: ``False`` for a non-negative tensor (after ReLU: codes ``[0, 2^b-1]``, negatives clip to
            0, so this *is* the ReLU); ``True`` for codes ``[-2^(b-1), 2^(b-1)-1]``; ``None`` decides
            from the data: signed when the observer finds (tail-trimmed) values below 0 — with a
            :class:`RangeTracker` from the first observed batch, the only host sync PACT2 ever makes, once.
        clip_range: a fixed range; skips estimation.
        cap: an upper clip that stays in force under any range (6 where a ReLU6 was).
        power2: round the range up to a power of two (TIDL); otherwise use it as is.
        observer: the :class:`~xnnq.layers.observer.RangeObserver` that sets the range from data in
            training mode; default a :class:`RangeTracker` with ``tail`` and ``ema_alpha`` (QAT).
        tail, ema_alpha: of the default :class:`RangeTracker`.
        name: the module's path in the model, used in error messages.
        rounding: how codes are rounded (:mod:`xnnq.layers.rounding`); default ``"half_even"``, what
            onnxruntime computes for the exported QDQ file; ``"tidl"``: TIDL's rule at this quantizer's
            ``site`` (``"requant"``; the wrappers set ``"input"`` on the network-input quantizer and
            ``"resize"`` after a linear resize). Set it on a whole model with :func:`xnnq.layers.set_rounding`.
        learned_range: a :class:`~xnnq.layers.tqt.LearnedRange`: the range is a learned power-of-2
            threshold (TQT), set from the observer's range during its first batches and trained from then on
            (with its ``anchor="statistics"`` the observer keeps running until the range freezes and the
            threshold moves with its power of two; with ``"init"`` the observer is called only until then);
            ``None``: the range is the observer's.
        inplace: the float op this module replaced (a ReLU / ReLU6) worked in place: so does
            :meth:`float_forward` (calibration, quantization off), as the float model would, and so does the
            fused fake-quantization on CPU (:func:`~xnnq.layers.fused.fake_quantize_activation`) unless a
            forward hook is registered on this module (a hook sees the input as it was).

    The range is observed in training mode unless frozen (:func:`freeze_quant_range`); ``train()`` and
    ``eval()`` never change the frozen state. An observer that works in float while observing (calibration)
    sets the range in :meth:`settle_range`. State: the observer's buffers, and ``frozen``, ``observed``,
    ``quant_enabled`` and ``data_signed`` (saved in the state dict as extra state).
    """

    def __init__(
        self,
        bits: int = 8,
        signed: bool | None = None,
        clip_range: float | None = None,
        cap: float | None = None,
        power2: bool = True,
        tail: float = 1e-4,
        ema_alpha: float = 0.01,
        name: str = "",
        observer: RangeObserver | None = None,
        rounding: Rounding | str = DEFAULT,
        learned_range: LearnedRange | None = None,
        inplace: bool = False,
    ):
        super().__init__()
        check_bits(bits, name)
        if clip_range is not None and clip_range <= 0:
            raise ValueError(f"{name or 'PACT2'}: clip_range must be > 0, got {clip_range}")
        self.bits, self.signed, self.clip_range, self.cap, self.power2 = bits, signed, clip_range, cap, power2
        self.name = name
        self.rounding: Rounding = as_rounding(rounding)
        self.site: Site = Site.REQUANT
        self.observer = (
            observer
            if observer is not None
            else RangeTracker(tail=tail, ema_alpha=ema_alpha, track_min=signed is not False)
        )
        if clip_range is not None:  # a fixed range lives in the same buffers, never updated
            self.observer.set_range(clip_range, signed is not False)
        if learned_range is not None and clip_range is not None:
            raise ValueError(f"{name or 'PACT2'}: a fixed clip_range is not learned; give one or the other")
        self.learned_range = learned_range
        self.inplace = bool(inplace)
        self._producer_hooks: dict | None = None  # the producer's forward hooks; see overwrite_output_of
        self._consumer_hooks: tuple[dict, ...] | None = None  # the consumer's hooks; see own_gradient_from
        self.frozen = False
        self.observed = clip_range is not None
        self.quant_enabled = True
        self.data_signed: bool | None = None

    # ----------------------------------------------------------------------------------------- state
    def get_extra_state(self) -> dict[str, Any]:
        return {
            "frozen": self.frozen,
            "observed": self.observed,
            "quant_enabled": self.quant_enabled,
            "data_signed": self.data_signed,
            "bits": self.bits,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("bits", self.bits) != self.bits:
            raise ValueError(
                f"{self.name or 'PACT2'}: the state dict was saved with {state['bits']}-bit activations, "
                f"this model quantizes to {self.bits} bits. Build the wrapper with the same bitwidth "
                "settings (bitwidth_activations / bitwidth_overrides) as the saved one."
            )
        self.frozen = bool(state["frozen"])
        self.observed = bool(state["observed"])
        self.quant_enabled = bool(state["quant_enabled"])
        self.data_signed = state.get("data_signed")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        old = prefix + "tracker."  # the observer's name in state dicts saved before it was injectable
        for key in [k for k in state_dict if k.startswith(old)]:
            state_dict[prefix + "observer." + key[len(old) :]] = state_dict.pop(key)
        LearnedRange.check_state_dict(
            state_dict, prefix, self.learned_range, self.name or "PACT2", strict=args[1]
        )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def observing(self) -> bool:
        """True when a forward call feeds the observer: training mode, not frozen, no fixed range (and, with a
        learned range, only while it is set from or follows the statistics)."""
        return (
            self.training
            and not self.frozen
            and self.clip_range is None
            and (self.learned_range is None or self.learned_range.wants_statistics)
        )

    def statistics_range(self) -> torch.Tensor:
        """The observer's range ``max(-min, max)`` (under the cap): what a learned threshold starts from and,
        with ``anchor="statistics"``, moves with."""
        lo, hi = self.range_tensors()
        r = torch.maximum(-lo, hi)
        return r if self.cap is None else r.clamp(max=self.cap)

    def _anchor_range(self) -> torch.Tensor | None:
        """The statistics' range a learned threshold moves with, or ``None`` when it does not follow them."""
        return self.statistics_range() if self.learned_range.anchored else None

    def log2_cap(self) -> float | None:
        """``log2`` of the cap: the bound of a learned threshold (its power of two stays ``>= cap``'s)."""
        return None if self.cap is None else math.log2(self.cap)

    # ------------------------------------------------------------------------------------ numerics
    def range_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (min, max) the quantizer works from: observed, or the fixed clip range stored at construction."""
        return self.observer.min_val, self.observer.max_val

    def resolved_signed(self) -> bool:
        """Signedness in force: as given, else as decided from the first observed batch (signed if unknown)."""
        if self.signed is not None:
            return self.signed
        return True if self.data_signed is None else self.data_signed

    def qparams(self) -> tuple[torch.Tensor, int, int]:
        """``(scale, qmin, qmax)``: a 0-d scale tensor on the module's device and integer code bounds."""
        if self.learned_range is not None:
            signed = self.resolved_signed()
            qmin, qmax = quant_bounds(self.bits, signed)
            scale = self.learned_range.scale(self.bits, signed, self.log2_cap(), self._anchor_range())
            return scale, qmin, qmax
        lo, hi = self.range_tensors()
        signed = self.resolved_signed()
        qmin, qmax = quant_bounds(self.bits, signed)
        if hi.is_cpu and hi.dtype == torch.float32 and lo.dtype == torch.float32 and c_kernels_ready():
            levels = grid_levels(self.bits, signed, self.power2)  # the same value in one C call
            return cpu_kernels.act_scale(lo, hi, self.cap, MIN_RANGE, self.power2, levels), qmin, qmax
        r = torch.maximum(-lo, hi)
        if self.cap is not None:
            r = r.clamp(max=self.cap)
        return activation_scale(r, self.bits, signed, self.power2), qmin, qmax

    def scale(self) -> torch.Tensor:
        return self.qparams()[0]

    def clip_values(self) -> tuple[float, float]:
        """The float clip interval this quantizer implements (for export): ``(-R, R)``, ``(0, R)`` or ``(0, cap)``."""
        scale, qmin, _ = self.qparams()
        r = float(scale) * grid_levels(self.bits, qmin < 0, self.power2)
        lo = -r if qmin < 0 else 0.0
        hi = r if self.cap is None else min(r, float(self.cap))
        return lo, hi

    def float_forward(self, x: torch.Tensor) -> torch.Tensor:
        """What this module computes with quantization switched off: the op it replaced (in place when that
        op was: no new activation-sized tensor)."""
        if self.signed is False:
            if self.inplace:
                return x.clamp_(min=0.0, max=self.cap) if self.cap is not None else torch.relu_(x)
            return x.clamp(min=0.0, max=self.cap) if self.cap is not None else torch.relu(x)
        return x

    @torch.no_grad()
    def settle_range(self) -> float | None:
        """Let the observer choose the range from what it observed (calibration); returns the range, or
        ``None`` when there was nothing to choose (nothing observed, a fixed range, or a running range that
        is always current). Under ``torch.distributed`` every rank must call it, in the same order."""
        chosen = self.observer.settle(self.bits, self.signed, self.power2)
        if chosen is None or self.clip_range is not None:
            return None
        r, signed = chosen
        if self.signed is None:
            self.data_signed = signed
        self.observed = True
        return r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            observer = self.observer
            observer.forward(x)  # an internal module: no hooks to run
            if observer.float_while_observing:  # calibration: the observer raises on NaN / Inf itself
                return self.float_forward(x)
            if x.device.type == "cpu" and bool(observer.nonfinite_batches):  # free on CPU; elsewhere counted
                observer.nonfinite_batches.zero_()
                raise FloatingPointError(
                    f"{self.name or 'PACT2'}: the activation holds NaN or Inf; the range was not updated. "
                    "Check the input data and the learning rate (lower it, or clip gradients)."
                )
            if self.signed is None and self.data_signed is None:
                # decided by the first batch that decides it (a skipped non-finite batch decides nothing)
                self.data_signed = self.observer.observed_signed()
            self.observed = True
            if self.learned_range is not None and self.learned_range.initializing:
                self.learned_range.init_from(self.statistics_range())
        if not self.quant_enabled:
            return self.float_forward(x)
        if not self.observed:
            raise RuntimeError(
                f"{self.name or 'PACT2'}: no activation range has been observed yet. Run forward passes in "
                "training mode (QAT or calibration) before evaluating or exporting, or load a state dict."
            )
        rounding = resolve(self.rounding, self.site)
        if self.learned_range is not None:
            return self.learned_range.fake_quantize(
                x,
                self.bits,
                self.resolved_signed(),
                log2_max=self.log2_cap(),
                rounding=rounding,
                r=self._anchor_range(),
                cap=self.cap,
            )
        scale, qmin, qmax = self.qparams()
        if rounding is Rounding.HALF_EVEN:  # the fused one-pass kernels round half to even
            return fake_quantize_activation(
                x,
                scale,
                qmin,
                qmax,
                self.cap,
                inplace=self._may_overwrite(),
                grad_inplace=self._may_overwrite_gradient(),
            )
        if self.cap is not None:
            x = x.clamp(max=self.cap)
        return fake_quantize(x, scale, qmin, qmax, rounding=rounding)

    def overwrite_output_of(self, producer: nn.Module) -> None:
        """This quantizer's input is the fresh output of ``producer``, read by nothing else, and ``producer``'s
        backward does not need it (the build checks both): the fused kernel may write the quantized values
        into it, as long as no forward hook on ``producer`` (checked at every call) could have kept it."""
        self._producer_hooks = producer._forward_hooks  # the dict itself: hooks added later are seen

    def input_overwrite_hooks(self) -> tuple[dict, ...] | None:
        """The hook dicts that must be empty (with no global hook) for the input to be overwritten, or ``None``
        when it never may: it may when the float op was in place (so nothing else reads its input in the
        user's model either) or :meth:`overwrite_output_of` allowed it, and no hook could keep the input."""
        if self.inplace:
            return self._forward_hooks, self._forward_pre_hooks
        if self._producer_hooks is not None:
            return self._forward_hooks, self._forward_pre_hooks, self._producer_hooks
        return None

    def _may_overwrite(self) -> bool:
        """The fake-quantized values may be written into the input now (:meth:`input_overwrite_hooks`)."""
        hooks = self.input_overwrite_hooks()
        return hooks is not None and unhooked(*hooks)

    def own_gradient_from(self, consumer: nn.Module) -> None:
        """This quantizer's output is read only by ``consumer``, whose backward makes a gradient tensor of its
        own for it (a conv/linear or an element-wise activation; the build checks both): the fused backward may
        mask that gradient in place, as long as no hook on ``consumer`` (checked at every call) could keep it."""
        self._consumer_hooks = (
            consumer._forward_pre_hooks,
            consumer._forward_hooks,
            consumer._backward_pre_hooks,
            consumer._backward_hooks,
        )  # the dicts themselves: hooks added later are seen

    def _may_overwrite_gradient(self) -> bool:
        """The backward may overwrite its incoming gradient: :meth:`own_gradient_from` allowed it and no hook on
        this quantizer, its consumer or every module could keep the output or its gradient."""
        return self._consumer_hooks is not None and unhooked(
            *self._consumer_hooks,
            self._forward_hooks,
            self._backward_hooks,
            self._backward_pre_hooks,
            backward=True,
        )

    def extra_repr(self) -> str:
        s = f"bits={self.bits}, signed={self.signed}, power2={self.power2}"
        if self.clip_range is not None:
            s += f", clip_range={self.clip_range}"
        if self.cap is not None:
            s += f", cap={self.cap}"
        if self.rounding is not DEFAULT or self.site is not Site.REQUANT:
            s += f", rounding={self.rounding.value}@{self.site.value}"
        return s + (", frozen" if self.frozen else "")
