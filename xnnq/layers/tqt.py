"""Learned power-of-2 ranges: trained quantization thresholds (TQT; Jain, Gural, Wu, Dick, "Trained
Quantization Thresholds for Accurate and Efficient Fixed-Point Inference of Deep Neural Networks",
MLSys 2020, arXiv:1903.08066).

The threshold ``t`` of a quantizer is learned as ``u = log2 t``; the forward uses the power of two above
it, so every scale stays what TIDL accepts:

* ``s = 2^ceil(u) / 2^(b-1)`` signed (codes ``[-2^(b-1), 2^(b-1)-1]``), ``2^ceil(u) / 2^b`` unsigned
  (codes ``[0, 2^b-1]``) — the numerics of :func:`~xnnq.layers.fake_quant.activation_scale` for the range
  ``2^ceil(u)``, so ``q(x)`` is bit for bit :func:`~xnnq.layers.fake_quant.fake_quantize` with that scale.
* Gradients (straight-through for ``round`` and ``ceil``; the paper's equations):

  - input: 1 where the rounded code is in ``[qmin, qmax]``, else 0 (the existing STE mask);
  - ``u``: ``∂q/∂u = s·ln2·(round(x/s) − x/s)`` where the code is in range (pushes ``t`` down: resolution),
    ``s·ln2·qmin`` below and ``s·ln2·qmax`` above (pushes ``t`` up: less clipping). The sum over the
    tensor (per channel: over everything but the channel axis) reaches ``u``, times ``grad_scale``.

* Why ``log2 t`` (the paper's argument for log-domain training): ``∂L/∂u = t·ln2·∂L/∂t``, so a gradient step
  on ``u`` changes ``t`` *relatively*, the same way for a layer whose values are 1e-3 as for one whose values
  are 1e3; and if a layer's values are scaled by ``k`` (and the next layer's weights by ``1/k``) the gradient
  of ``u`` does not change. What still varies across layers is the gradient's magnitude (it is a sum over all
  elements of the tensor, and the clipped elements weigh ``qmax``, i.e. ~2^(b-1), against ≤ 0.5 for the
  in-range ones): the paper therefore trains thresholds with a normalized-gradient optimizer (Adam; the
  authors' Graffitist recipe: lr 1e-2 for thresholds, separate from the weights). ``grad_scale`` multiplies
  the gradient for optimizers that do not normalize (see :class:`LearnedRange`).
* On CPU a per-tensor threshold with half-to-even rounding on a contiguous float32 tensor runs in one C pass
  each way (:func:`~xnnq.layers.cpu_kernels.tqt_forward` / :func:`~xnnq.layers.cpu_kernels.tqt_backward`; the
  threshold's sum stays torch's ``dot``): the values and gradients of the torch ops, bit for bit (tested).
  Elsewhere (per channel, other roundings, other devices) the torch ops run.
* Numerically safe: ``u`` is clamped to ``[LOG2_MIN, LOG2_MAX]`` (and to an optional per-quantizer upper
  bound) in the forward; outside the clamp its gradient only passes in the direction back inside, so a
  threshold of 0 (``u = -inf``), a tiny or a huge one never produces NaN or Inf and never gets stuck.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from . import cpu_kernels
from .fake_quant import MIN_RANGE, _along, _mask_bounds, ceil_log2, check_bits, fake_quantize, quant_bounds
from .fused import on_c_path
from .rounding import Rounding, resolve, round_tensor_

LOG2_MIN = math.log2(MIN_RANGE)  # -24: the smallest range xnnq represents (as pow2_ceil)
LOG2_MAX = 64.0  # far above any activation or weight range; keeps 2^u finite in float32
_LN2 = math.log(2.0)


def _levels_log2(bits: int, signed: bool) -> int:
    """log2 of the number of steps in the range ``2^e``: the scale is ``2^(e - levels_log2)``."""
    return bits - 1 if signed else bits


def effective_log2(log2_t: torch.Tensor, log2_max: torch.Tensor | float | None = None) -> torch.Tensor:
    """``u`` clamped to ``[LOG2_MIN, min(LOG2_MAX, log2_max)]`` (NaN-free for finite or infinite ``u``)."""
    u = log2_t.clamp(LOG2_MIN, LOG2_MAX)
    return u if log2_max is None else _at_most(u, log2_max)


def _at_most(t: torch.Tensor, bound: torch.Tensor | float) -> torch.Tensor:
    """``min(t, bound)``; a Python number as a clamp (no tensor made from it: torch.compile traces that
    without a graph break, also inside an autograd.Function)."""
    if isinstance(bound, torch.Tensor):
        return torch.minimum(t, bound.to(dtype=t.dtype, device=t.device))
    return t.clamp(max=float(bound))


def _upper(log2_max: torch.Tensor | float | None, like: torch.Tensor) -> torch.Tensor:
    """The upper clamp of ``u``: ``min(LOG2_MAX, log2_max)`` as a tensor like ``like``."""
    hi = torch.full_like(like, LOG2_MAX)
    return hi if log2_max is None else _at_most(hi, log2_max)


def tqt_scale(
    log2_t: torch.Tensor, bits: int, signed: bool, log2_max: torch.Tensor | float | None = None
) -> torch.Tensor:
    """The power-of-2 scale in force for the log2 threshold ``log2_t`` (detached; same shape)."""
    e = torch.ceil(effective_log2(log2_t.detach(), log2_max))
    return torch.exp2(e - _levels_log2(bits, signed))


class _TQTFakeQuant(torch.autograd.Function):
    """Forward: ``clamp(round(x / s), qmin, qmax) · s`` with ``s = tqt_scale(u)``; backward: the TQT gradients
    (module docstring). Saves the codes ``x / s`` (one tensor of ``x``'s size, as the STE of fake_quant)."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        log2_t: torch.Tensor,
        value: torch.Tensor | None,
        bits: int,
        signed: bool,
        axis: int | None,
        grad_scale: float,
        log2_max: torch.Tensor | float | None,
        rounding: Rounding,
        shift: torch.Tensor | None,
        cap: float | None,
    ) -> torch.Tensor:
        qmin, qmax = quant_bounds(bits, signed)
        u = log2_t.detach() if value is None else value.detach()
        if shift is not None:
            u = u + shift.detach()
        scale = tqt_scale(u, bits, signed, log2_max).to(x.dtype)
        ctx.c_kernels = _on_c_kernels(x, axis, rounding)
        capmask = None
        if ctx.c_kernels:  # one C pass, the same values as the torch ops below (and the cap's clamp)
            out, codes, capmask = cpu_kernels.tqt_forward(x, scale, qmin, qmax, cap)
        else:  # tqt_fake_quantize applied the cap already
            s = _along(scale, x, axis)
            codes = torch.mul(x, 1.0 / s)
            out = round_tensor_(torch.clamp(codes, qmin, qmax), rounding).mul_(s)
        ctx.save_for_backward(codes, scale, u, _upper(log2_max, u), capmask)
        ctx.qrange, ctx.axis, ctx.rounding = (qmin, qmax), axis, rounding
        ctx.grad_scale = 0.0 if value is not None else float(grad_scale)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        codes, scale, u, hi_u, capmask = ctx.saved_tensors
        qmin, qmax = ctx.qrange
        lo, hi = _mask_bounds(qmin, qmax)
        want_u = ctx.needs_input_grad[1] and ctx.grad_scale != 0.0
        inner = None
        if ctx.c_kernels and grad.dtype == torch.float32 and grad.is_contiguous():
            # one C pass for the input's gradient and the threshold's factor; the same values as the torch ops
            grad_x, inner = cpu_kernels.tqt_backward(
                grad, codes, capmask, qmin, qmax, lo, hi, with_inner=want_u
            )
        else:
            grad_x = torch.ops.aten.hardtanh_backward(grad, codes, lo, hi)  # 1 where the code is in range
            if capmask is not None:  # the cap's clamp: its gradient passes where x < cap
                grad_x = torch.where(capmask.view(grad_x.shape).bool(), grad_x, 0.0)
        grad_u = None
        if ctx.needs_input_grad[1] and not want_u:
            grad_u = torch.zeros_like(u)
        elif want_u:
            g, c = grad, codes
            if g.dtype != torch.float32:  # accumulate half / bfloat16 in float32
                g, c = g.float(), c.float()
            if inner is None:
                # q − x/s in range, qmin / qmax where clipped: round(clamp(c)) minus c where in range
                inner = round_tensor_(c.clamp(qmin, qmax), ctx.rounding).sub_(
                    torch.ops.aten.hardtanh_backward(c, c, lo, hi)
                )
            if ctx.axis is None:
                total = torch.dot(g.reshape(-1), inner.reshape(-1))
            else:
                total = (g * inner).sum([d for d in range(c.dim()) if d != ctx.axis])
            grad_u = (total * scale.float() * (_LN2 * ctx.grad_scale)).to(u.dtype).reshape(u.shape)
            # outside the clamp only a step back inside passes (descent moves u by -grad)
            outward = ((u > hi_u) & (grad_u < 0)) | ((u < LOG2_MIN) & (grad_u > 0))
            grad_u = torch.where(outward, torch.zeros_like(grad_u), grad_u)
        grad_x = grad_x if ctx.needs_input_grad[0] else None
        return grad_x, grad_u, None, None, None, None, None, None, None, None, None


def _on_c_kernels(x: torch.Tensor, axis: int | None, rounding: Rounding) -> bool:
    """Whether the TQT forward and backward of ``x`` run in the C kernels (:mod:`xnnq.layers.cpu_kernels`): per
    tensor, half-to-even rounding, a contiguous float32 CPU tensor, the kernels switched on and built."""
    return (
        axis is None
        and rounding is Rounding.HALF_EVEN
        and x.dtype == torch.float32
        and x.is_contiguous()
        and x.numel() > 0
        and on_c_path(x.view(-1))
    )


def tqt_fake_quantize(
    x: torch.Tensor,
    log2_t: torch.Tensor,
    bits: int,
    signed: bool,
    axis: int | None = None,
    grad_scale: float = 1.0,
    log2_max: torch.Tensor | float | None = None,
    frozen_value: torch.Tensor | None = None,
    rounding: Rounding | str = Rounding.HALF_EVEN,
    shift: torch.Tensor | None = None,
    cap: float | None = None,
) -> torch.Tensor:
    """Fake-quantize ``x`` with the learned power-of-2 threshold ``2^log2_t`` (TQT gradients to ``log2_t``).

    Args:
        x: the tensor.
        log2_t: ``log2`` of the threshold: 0-d (per tensor) or 1-d along ``axis`` (per channel).
        bits, signed: 8 or 16; signed codes ``[-2^(b-1), 2^(b-1)-1]`` or unsigned ``[0, 2^b-1]``.
        grad_scale: multiplies the gradient of ``log2_t``.
        log2_max: an upper bound on the threshold's log2 (a scalar or one per channel), e.g. ``log2 6``
            under a ReLU6 cap.
        frozen_value: when given, the forward uses it instead of ``log2_t``, and ``log2_t`` gets a zero
            gradient (it stays in the graph: DDP expects a gradient for every parameter in every step).
        rounding: a concrete mode of :mod:`xnnq.layers.rounding` (default half to even); the in-range gradient
            uses the same rounding residual.
        shift: added to ``log2_t`` (or ``frozen_value``) in the forward, not differentiated (``∂u/∂log2_t``
            stays 1): the octaves the statistics' power of two moved since the threshold was anchored.
        cap: ``x.clamp(max=cap)`` first (a ReLU6's 6), with that clamp's gradient (passing where ``x < cap``);
            on the C kernels in the same pass.
    """
    check_bits(bits)
    if axis is None and log2_t.dim() != 0:
        raise ValueError(
            f"tqt_fake_quantize: a per-tensor log2 threshold must be 0-d, got shape {tuple(log2_t.shape)}"
        )
    if axis is not None and (log2_t.dim() != 1 or log2_t.numel() != x.shape[axis]):
        raise ValueError(
            f"tqt_fake_quantize: per-channel log2 thresholds need shape ({x.shape[axis]},) along "
            f"axis {axis}, got {tuple(log2_t.shape)}"
        )
    rounding = resolve(rounding)
    if cap is not None and not _on_c_kernels(x, axis, rounding):
        x, cap = x.clamp(max=cap), None  # the cap is on the grid of every power-of-2 range >= it
    return _TQTFakeQuant.apply(
        x, log2_t, frozen_value, int(bits), bool(signed), axis, grad_scale, log2_max, rounding, shift, cap
    )


def octave_centre(r: torch.Tensor) -> torch.Tensor:
    """``ceil(log2 r) - 1/2`` of a range ``r`` (ranges below ``MIN_RANGE``, 0 included, as ``MIN_RANGE``): the
    middle of the octave ``(e-1, e]`` whose power of two ``2^e`` the range rounds up to (:func:`pow2_ceil`'s).
    A threshold started there gives the statistics' scale and sits half an octave from both neighbours, so
    only a gradient that keeps its sign over many steps moves it to another power of two; one started at
    ``log2 r`` itself (often a hair below ``e``) flips to ``2^(e+1)`` on the first noisy steps."""
    return ceil_log2(r.detach().float().clamp(min=MIN_RANGE)).clamp(LOG2_MIN, LOG2_MAX) - 0.5


ANCHORS = ("statistics", "init")


class LearnedRange(nn.Module):
    """The learned log2 threshold of one quantizer (a tensor's range, or one per channel).

    State: the parameter ``log2_t``; the buffers ``frozen_log2_t`` (held while frozen), ``anchor`` (the
    statistics' octave centre at initialisation) and ``held`` (the octave in force, with a hysteresis); extra
    state ``frozen``, ``init_steps`` (training forwards that have set the threshold from statistics), the
    anchor mode and the hysteresis.

    * Initialisation: for the first ``init_batches`` training forwards the owner passes the range its
      statistics give (:meth:`init_from`) and the threshold is set to the centre of its octave
      (:func:`octave_centre`); from then on it is learned. The
      parameter takes part in every forward (DDP sees it used and all-reduces its gradient).
    * ``anchor="statistics"`` (default): the owner keeps its statistics running (activations: the observer,
      until the range freezes; weights: the max rule of the current weight, always) and passes their range
      ``r`` wherever the threshold is used; the threshold in force is ``log2_t + (octave_centre(r) -
      anchor)``, ``anchor`` being the centre set at initialisation. So when the statistics' power of two
      moves by ``k`` octaves the threshold moves by ``k`` with it, and what is learned is an offset from that
      power of two: while the gradient has not moved ``log2_t`` half an octave from ``anchor`` the quantizer
      computes exactly what statistics QAT computes (tested). ``anchor="init"``: the statistics set the
      threshold during initialisation only (the paper's TQT) and are not followed after.
    * Freezing (``frozen = True``, :func:`~xnnq.layers.freeze_quant_range`): ``log2_t`` is copied to
      ``frozen_log2_t`` and used in its place from then on, whatever the optimizer still does to ``log2_t`` (momentum,
      weight decay); ``log2_t`` gets a zero gradient. Unfreezing copies the frozen value back and learning
      resumes from it.
    * ``hysteresis`` (octaves, default 0: the paper's ``ceil``): the octave in force changes only when
      ``log2_t`` has gone that far past the boundary of the octave in force. ``held`` (a buffer: octaves from
      ``anchor``) is the octave in force; the forward uses its centre, ``anchor + held`` (plus the statistics'
      shift), and the gradient still reaches ``log2_t``. Under ``ceil`` a threshold whose best range lies
      between two powers of two sits on their boundary and crosses it back and forth (the gradient at each
      power points to the other), so the scale flips and the octave it is frozen in is the side it happened
      to be on; the margin damps those flips (the oscillations of Nagel et al., "Overcoming Oscillations in
      Quantization-Aware Training", ICML 2022, at the level of a scale).
    * ``grad_scale`` multiplies the gradient of ``log2_t`` (1: the paper's gradient, for Adam).
    """

    def __init__(
        self,
        shape: tuple[int, ...] = (),
        init_batches: int = 1,
        grad_scale: float = 1.0,
        name: str = "",
        anchor: str = "statistics",
        hysteresis: float = 0.0,
    ):
        super().__init__()
        if not 0.0 <= hysteresis <= 0.5:
            raise ValueError(
                f"{name or 'LearnedRange'}: hysteresis must be in [0, 0.5] octaves, got {hysteresis}"
            )
        if init_batches < 1:
            raise ValueError(f"{name or 'LearnedRange'}: init_batches must be >= 1, got {init_batches}")
        if anchor not in ANCHORS:
            raise ValueError(
                f"{name or 'LearnedRange'}: anchor must be one of {', '.join(map(repr, ANCHORS))}, got {anchor!r}"
            )
        self.log2_t = nn.Parameter(torch.zeros(shape))
        self.register_buffer("frozen_log2_t", torch.zeros(shape))
        self.register_buffer("anchor", torch.zeros(shape))
        self.register_buffer("held", torch.zeros(shape))  # octaves from ``anchor`` in force (hysteresis)
        self.hysteresis = float(hysteresis)
        self.init_batches, self.grad_scale, self.name = int(init_batches), float(grad_scale), name
        self.anchored = anchor == "statistics"
        self.init_steps = 0
        self._frozen = False

    # ------------------------------------------------------------------------------------------ state
    @property
    def frozen(self) -> bool:
        return self._frozen

    @frozen.setter
    def frozen(self, value: bool) -> None:
        value = bool(value)
        with torch.no_grad():
            if value and not self._frozen:
                self.frozen_log2_t.copy_(self._learned_in_force())
            elif not value and self._frozen:
                self.log2_t.copy_(self.frozen_log2_t)
        self._frozen = value

    @property
    def anchor_mode(self) -> str:
        """``"statistics"`` or ``"init"`` (the constructor's ``anchor``)."""
        return ANCHORS[0] if self.anchored else ANCHORS[1]

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "frozen": self._frozen,
            "init_steps": self.init_steps,
            "anchor": self.anchor_mode,
            "hysteresis": self.hysteresis,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        saved = state.get("anchor", "init")  # state saved before anchors: the paper's behaviour
        if saved != self.anchor_mode:
            raise ValueError(
                f"{self.name or 'LearnedRange'}: the state dict was saved with range_anchor={saved!r}; build "
                f"the wrapper with range_anchor={saved!r} (the thresholds mean another thing under the other)."
            )
        saved_h = float(state.get("hysteresis", 0.0))
        if saved_h > 0.0 and self.hysteresis == 0.0 and not state["frozen"]:
            raise ValueError(
                f"{self.name or 'LearnedRange'}: the state dict was saved with range_hysteresis={saved_h}, whose "
                "octave in force is held apart from the threshold; build the wrapper with range_hysteresis > 0 "
                "(or load a state saved after freeze_quant_range)."
            )
        self._frozen = bool(state["frozen"])  # not the setter: both tensors were loaded as saved
        self.init_steps = int(state["init_steps"])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "log2_t" in state_dict and prefix + "anchor" not in state_dict:  # saved before anchors
            if self.anchored and args[1]:
                raise ValueError(
                    f"{self.name or 'LearnedRange'}: the state dict was saved by an xnnq whose learned "
                    "thresholds did not follow the statistics; build the wrapper with range_anchor='init'."
                )
            # the centre of the threshold's octave: the value in force with a hysteresis, as it was without
            state_dict[prefix + "anchor"] = torch.ceil(state_dict[prefix + "log2_t"]) - 0.5
        extra = state_dict.get(prefix + "_extra_state")
        saved_h = extra.get("hysteresis", 0.0) if isinstance(extra, dict) else 0.0
        if prefix + "log2_t" in state_dict and saved_h == 0.0:  # saved with the paper's ceil (or before held)
            offset = state_dict[prefix + "log2_t"] - state_dict[prefix + "anchor"]
            state_dict[prefix + "held"] = torch.ceil(offset - 0.5)  # the octave its ceil had in force
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @staticmethod
    def check_state_dict(
        state_dict: dict, prefix: str, learned: LearnedRange | None, owner: str, strict: bool = True
    ) -> None:
        """Refuse, naming the module and the fix, a state dict whose learned thresholds do not match the
        owner's settings (``prefix`` is the owner's; its LearnedRange is the child ``learned_range``)."""
        if not strict:
            return
        has = prefix + "learned_range.log2_t" in state_dict
        if has and learned is None:
            raise ValueError(
                f"{owner}: the state dict holds a learned range threshold (saved with "
                "range_learning='tqt'); build this wrapper with the same range_learning as the saved one."
            )
        if learned is not None and not has:
            raise ValueError(
                f"{owner}: this model learns its range (range_learning='tqt'...) but the state dict has "
                "no learned threshold for it; build the wrapper with the range_learning the state dict "
                "was saved with."
            )

    # ------------------------------------------------------------------------------- initialisation
    @property
    def initializing(self) -> bool:
        """True while the threshold is still set from statistics (no host sync: a Python count)."""
        return not self._frozen and self.init_steps < self.init_batches

    @property
    def wants_statistics(self) -> bool:
        """True when a training forward should update the owner's statistics and pass them to
        :meth:`init_from`: while initialising, and with ``anchor="statistics"`` until the range freezes."""
        return not self._frozen and (self.anchored or self.init_steps < self.init_batches)

    @torch.no_grad()
    def init_from(self, r: torch.Tensor) -> None:
        """Set the threshold from the range ``r`` (same shape as ``log2_t``) and count one initialising step:
        ``log2_t`` (and ``anchor``) become the centre of the octave of ``r`` (:func:`octave_centre`), so the
        scale in force is the power of two the statistics give."""
        centre = octave_centre(r).reshape(self.log2_t.shape)
        self.log2_t.copy_(centre)
        self.anchor.copy_(centre)
        self.held.zero_()
        self.init_steps += 1

    @property
    def holds(self) -> bool:
        """True when the octave in force is ``held`` (a hysteresis, after initialisation), not ``ceil(log2_t)``."""
        return self.hysteresis > 0.0 and self.init_steps > 0

    @torch.no_grad()
    def update_held(self) -> None:
        """Move ``held`` to the octave of ``log2_t`` where ``log2_t`` has left the held octave by more than
        ``hysteresis`` (octave ``k`` spans offsets ``(k - 1/2, k + 1/2]`` from ``anchor``); no host sync."""
        offset = self.log2_t - self.anchor
        margin = 0.5 + self.hysteresis
        leave = (offset <= self.held - margin) | (offset > self.held + margin)
        self.held.copy_(torch.where(leave, torch.ceil(offset - 0.5), self.held))

    def _learned_in_force(self) -> torch.Tensor:
        """The learned log2 threshold in force before the statistics' shift (detached, not frozen)."""
        return (self.anchor + self.held) if self.holds else self.log2_t.detach()

    @property
    def learned_log2(self) -> torch.Tensor:
        """The log2 threshold in force before the statistics' shift (detached): the frozen copy while frozen,
        else the centre of the octave held (with a hysteresis) or ``log2_t``."""
        return self.frozen_log2_t if self._frozen else self._learned_in_force()

    def shift(self, r: torch.Tensor | None) -> torch.Tensor | None:
        """The octaves the statistics' power of two (of the range ``r``) moved since initialisation (detached),
        or ``None``: with ``anchor="init"`` or before initialisation. An anchored threshold needs ``r``."""
        if not self.anchored or self.init_steps == 0:
            return None
        if r is None:
            raise ValueError(
                f"{self.name or 'LearnedRange'}: this threshold moves with the statistics "
                "(anchor='statistics'): pass their range r (PACT2.statistics_range(), or the max rule's)"
            )
        return octave_centre(r).reshape(self.anchor.shape) - self.anchor

    # ------------------------------------------------------------------------------------- numerics
    def in_force(self, r: torch.Tensor | None = None) -> torch.Tensor:
        """The log2 threshold the forward uses (detached): the frozen copy while frozen, else the centre of the
        octave held (with a hysteresis) or ``log2_t``; moved with the statistics' range ``r`` (the owner's, see
        the class docstring)."""
        u = self.learned_log2
        shift = self.shift(r)
        return u if shift is None else u + shift

    def scale(
        self,
        bits: int,
        signed: bool,
        log2_max: torch.Tensor | float | None = None,
        r: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The power-of-2 scale in force (detached)."""
        return tqt_scale(self.in_force(r), bits, signed, log2_max)

    def range(
        self,
        bits: int,
        signed: bool,
        log2_max: torch.Tensor | float | None = None,
        r: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The power-of-2 range ``2^ceil(log2 t)`` in force (detached)."""
        return self.scale(bits, signed, log2_max, r) * float(1 << _levels_log2(bits, signed))

    def fake_quantize(
        self,
        x: torch.Tensor,
        bits: int,
        signed: bool,
        axis: int | None = None,
        log2_max: torch.Tensor | float | None = None,
        rounding: Rounding | str = Rounding.HALF_EVEN,
        r: torch.Tensor | None = None,
        cap: float | None = None,
    ) -> torch.Tensor:
        """``min(x, cap)`` quantized with the threshold in force (``r``: the owner's statistics' range); without
        autograd the faster kernels of :func:`~xnnq.layers.fake_quant.fake_quantize` (the same values, bit for
        bit)."""
        if not torch.is_grad_enabled():
            if cap is not None:
                x = x.clamp(max=cap)
            return fake_quantize(
                x, self.scale(bits, signed, log2_max, r), *quant_bounds(bits, signed), axis, rounding=rounding
            )
        shift = self.shift(r)
        if self.holds and not self._frozen:
            if self.training:
                self.update_held()
            # log2_t + this = the held octave's centre
            held = (self.anchor + self.held - self.log2_t).detach()
            shift = held if shift is None else shift + held
        return tqt_fake_quantize(
            x,
            self.log2_t,
            bits,
            signed,
            axis,
            self.grad_scale,
            log2_max,
            frozen_value=self.frozen_log2_t if self._frozen else None,
            rounding=rounding,
            shift=shift,
            cap=cap,
        )

    def extra_repr(self) -> str:
        return (
            f"shape={tuple(self.log2_t.shape)}, init_batches={self.init_batches}, "
            f"grad_scale={self.grad_scale}, anchor={self.anchor_mode}, hysteresis={self.hysteresis}"
            + (", frozen" if self._frozen else "")
        )
