"""Conv2d / Linear with BatchNorm folded on the fly and fake-quantized weights and bias.

The folded layer keeps the float layer's parameters (same names, same objects) and receives the
BatchNorm that follows it and the quantizer of its input as forward arguments from the graph, so the
state dict keeps every original key and the data flow is explicit in the generated code.

Forward, with ``c = γ / sqrt(running_var + eps)`` per output channel:

* BN in eval mode (inference, or frozen with :func:`xnnq.utils.freeze_bn`), or no BN:
  ``y = conv(x, q(W·c), q_b(β + (b − μ)·c))`` — exactly what is exported.
* BN in training mode (one conv per forward; the correction of Krishnamoorthi 2018 without its second
  conv): ``y = BN_train(conv(x, q(W·c) / c) + b)`` (a channel with ``γ = 0`` keeps ``W``: it outputs ``β``
  whatever its conv computes). The weights are quantized as they will be deployed
  (folded with the running statistics); dividing the quantized kernel by ``c`` (instead of the conv
  output, as torch.ao does) costs nothing per pixel, and the batch statistics still drive the
  normalization and update the running statistics.

Weight outlier clipping (``constrain_weights``): the folded weights are clipped to
``±outlier_ratio·σ`` (σ the standard deviation of the folded tensor, ratio 15) when the weights beyond it
are *isolated*: at most one per 16 output channels (at least one). More of them are structure and are
kept. A trained layer's weights lie within about 11σ (ResNet-20 on
CIFAR-10: 4.3σ–10.8σ), so a normal model is unchanged; the identity taps of a re-parameterized
RepVGG/MobileOne kernel (up to one per output channel, often beyond 15σ) are kept; a single wild weight
that would inflate the power-of-2 range of the whole tensor is clipped.

The bias is quantized on the accumulator grid ``s_in · s_w`` (int32), ``s_in`` from the input quantizer;
with 8-bit operands its codes saturate where bias + products can no longer leave int32
(:func:`~xnnq.layers.fake_quant.accumulator_headroom`: TIDL and onnxruntime's fused kernels accumulate
in int32).

Memory: for a layer of at least ``RECOMPUTE_MIN_NUMEL`` weights the weight path (fold, quantize, unfold) is
recomputed in the backward (``torch.utils.checkpoint``, non-reentrant) instead of keeping its intermediate
weight-sized tensors (the folded copy, the fake-quant input) for it: the same operations run again, so the
gradients are bit-identical; the cost is one more pass over the weights, small beside the convolution.
Smaller layers (depthwise kernels) keep them: there the recomputation's per-layer overhead would cost more
than the memory saved. On CPU the C weight path (:mod:`xnnq.layers.fused_weight`, BatchNorm in training)
keeps nothing weight-sized in the first place and is not recomputed.

Learned weight ranges (``learned_range``, :mod:`xnnq.layers.tqt`): the threshold is set from the max rule
during its first training batches and learned from then on (by default as an offset from the current max
rule's power of two: :class:`~xnnq.layers.tqt.LearnedRange`); its power of two is capped at the max rule's
(a larger range only loses resolution, and TIDL's own power-of-2 rule on the exported weights would choose
the smaller one), so the exported weights re-quantize to themselves.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import fused_weight
from .bn_fold import bn_scale, fold_bn
from .fake_quant import (
    INT32_MAX,
    accumulator_headroom,
    check_bits,
    clip_fake_quantize,
    fake_quantize,
    max_abs,
    quant_bounds,
    quantize_bias,
    weight_scale_from_max,
)
from .tqt import LearnedRange

RECOMPUTE_MIN_NUMEL = 1 << 16  # weights from which the weight path is recomputed in the backward


class _FoldedWeightMixin:
    """Shared folding and weight quantization for :class:`QuantConv2d`, :class:`QuantConvTranspose2d` and
    :class:`QuantLinear`."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    out_axis: int = 0  # the weight's output-channel axis (1 for a transposed convolution's [in, out, kH, kW])

    learned_range: LearnedRange | None

    @classmethod
    def from_float(
        cls,
        layer: nn.Module,
        *,
        bits: int = 8,
        per_channel: bool = False,
        power2: bool = True,
        constrain_weights: bool = True,
        outlier_ratio: float = 15.0,
        name: str = "",
        learned_range: LearnedRange | None = None,
    ):
        """The quantized layer sharing ``layer``'s weight and bias parameters (built on the meta device by
        the subclass's ``_shell``, so nothing is allocated twice)."""
        q = cls._shell(layer)
        q.weight, q.bias = layer.weight, layer.bias
        q._init_quant(bits, per_channel, power2, constrain_weights, outlier_ratio, name, learned_range)
        return q

    def _init_quant(
        self,
        bits: int,
        per_channel: bool,
        power2: bool,
        constrain_weights: bool,
        outlier_ratio: float,
        name: str,
        learned_range: LearnedRange | None = None,
    ) -> None:
        check_bits(bits, name)
        self.weight_bits, self.per_channel, self.power2 = bits, per_channel, power2
        self.constrain_weights, self.outlier_ratio, self.name = constrain_weights, outlier_ratio, name
        self.quant_enabled = True
        # set by calibration (xnnq.calibrate); zeros leave the layer unchanged
        out, dev = self.weight.shape[self.out_axis], self.weight.device
        self.register_buffer("bias_correction", torch.zeros(out, dtype=self.weight.dtype, device=dev))
        self.register_buffer(
            "weight_range_shift", torch.zeros((out,) if per_channel else (), dtype=torch.long, device=dev)
        )
        if learned_range is not None and tuple(learned_range.log2_t.shape) != ((out,) if per_channel else ()):
            raise ValueError(
                f"{name}: a learned weight range needs shape {(out,) if per_channel else ()}, "
                f"got {tuple(learned_range.log2_t.shape)}"
            )
        self.learned_range = learned_range.to(dev) if learned_range is not None else None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for k in (
            "bias_correction",
            "weight_range_shift",
        ):  # absent from state dicts saved before they existed
            state_dict.setdefault(prefix + k, getattr(self, k))
        owner = self.name or type(self).__name__
        LearnedRange.check_state_dict(state_dict, prefix, self.learned_range, owner, strict=args[1])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "quant_enabled": self.quant_enabled,
            "bits": self.weight_bits,
            "per_channel": self.per_channel,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        saved = (state.get("bits", self.weight_bits), state.get("per_channel", self.per_channel))
        if saved != (self.weight_bits, self.per_channel):
            raise ValueError(
                f"{self.name or type(self).__name__}: the state dict was saved with {saved[0]}-bit "
                f"{'per-channel' if saved[1] else 'per-tensor'} weights, this model has {self.weight_bits}-bit "
                f"{'per-channel' if self.per_channel else 'per-tensor'}. Build the wrapper with the same "
                "bitwidth_weights / per_channel_q / bitwidth_overrides as the saved one."
            )
        self.quant_enabled = bool(state["quant_enabled"])

    # ------------------------------------------------------------------------------------- folding
    def _channel_view(self, v: torch.Tensor) -> torch.Tensor:
        """``v`` (one value per output channel) shaped to broadcast along the weight's output-channel axis."""
        return v.view(*([1] * self.out_axis), -1, *([1] * (self.weight.dim() - 1 - self.out_axis)))

    def folded_weight_bias(
        self, bn: nn.modules.batchnorm._BatchNorm | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Float weight and bias with ``bn`` (running statistics) folded in, minus ``bias_correction``.

        ``bias_correction`` (calibration's estimate of the output-mean shift caused by weight quantization)
        applies to layers that have a bias after folding; a layer with neither bias nor BN keeps none.
        """
        if bn is None:
            return self.weight, (self.bias - self.bias_correction if self.bias is not None else None)
        w, b = fold_bn(self.weight, self.bias, bn, self.out_axis)
        return w, b - self.bias_correction

    # ------------------------------------------------------------------------------- quantization
    def weight_axis(self) -> int | None:
        """The axis of per-channel weight scales (the output channels), ``None`` per tensor."""
        return self.out_axis if self.per_channel else None

    def outlier_bound(self, w: torch.Tensor) -> torch.Tensor:
        """``outlier_ratio·σ`` of ``w`` (0-d, detached), σ its sample standard deviation."""
        wd = w.detach()
        # σ as a two-pass norm (the sample standard deviation, as torch.std, in fewer kernels)
        sigma = torch.linalg.vector_norm(wd - wd.mean()) * (1.0 / max(1, wd.numel() - 1)) ** 0.5
        return self.outlier_ratio * sigma

    def clip_threshold(self, w: torch.Tensor) -> torch.Tensor:
        """The clipping bound of :meth:`constrain` for ``w`` (0-d, detached): ``outlier_ratio·σ`` when the
        weights beyond it are isolated, else ``inf`` (nothing clipped)."""
        wd = w.detach()
        t = self.outlier_bound(wd)
        isolated = (wd.abs() > t).sum(dtype=torch.int32) <= max(1, w.shape[self.out_axis] // 16)
        isolated &= (
            t > 0
        )  # σ = 0 (constant or single weights): nothing is an outlier, nothing is clipped to 0
        return torch.where(
            isolated, t, float("inf")
        )  # many outliers are structure (identity taps): keep them

    def constrain(self, w: torch.Tensor) -> torch.Tensor:
        """Clip isolated weight outliers (see the module docstring for the rule)."""
        if not self.constrain_weights:
            return w
        t = self.clip_threshold(w)
        return torch.clamp(w, -t, t)

    def grid_scale(self, w: torch.Tensor) -> torch.Tensor:
        """The scale of the grid :meth:`quantize_weight` puts the folded weight ``w`` on (outlier-constrained,
        divided by ``2^weight_range_shift``, or the learned range's)."""
        return self.quantize_weight(w.detach())[1]

    def _rule_range(self, w: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """(outlier bound or None, the range the max rule gives — ``min(max |constrain(w)|, 2^log2_rule)``, what
        a learned range starts from and moves with —, log2 of the max rule's power-of-2 range) of a folded
        weight."""
        axis = self.weight_axis()
        t = self.clip_threshold(w) if self.constrain_weights else None
        m = max_abs(w, axis) if t is None else torch.minimum(max_abs(w, axis), t)
        rule = weight_scale_from_max(m, self.weight_bits, self.power2, self.weight_range_shift)
        log2_rule = torch.log2(rule) + (self.weight_bits - 1)
        return t, torch.minimum(m, torch.exp2(log2_rule)), log2_rule

    def init_learned_range(self, w: torch.Tensor) -> None:
        """One initialising step of the learned range from the folded weight ``w``: the max rule's range."""
        self.learned_range.init_from(self._rule_range(w.detach())[1])

    def quantize_weight(
        self, w: torch.Tensor, scale_floor: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(quantized weight, its scale) from a folded float weight: ``constrain``, then the scale of the
        constrained weights (``max |constrain(w)| = min(t, max |w|)``, no second pass), at least
        ``scale_floor`` (:meth:`bias_scale_floor`; not applied to learned thresholds)."""
        if self.learned_range is not None:
            t, r, log2_rule = self._rule_range(w)
            if t is not None:
                w = torch.clamp(w, -t, t)
            bits, axis, learned = self.weight_bits, self.weight_axis(), self.learned_range
            r = r if learned.anchored else None
            return (
                learned.fake_quantize(w, bits, True, axis, log2_max=log2_rule, r=r),
                learned.scale(bits, True, log2_rule, r),
            )
        fused = fused_weight.quantize_weight(self, w, scale_floor)
        if fused is not None:
            return fused
        axis, (qmin, qmax) = self.weight_axis(), quant_bounds(self.weight_bits, True)
        t = self.clip_threshold(w) if self.constrain_weights else None
        m = max_abs(w, axis) if t is None else torch.minimum(max_abs(w, axis), t)
        scale = weight_scale_from_max(
            m, self.weight_bits, self.power2, self.weight_range_shift
        )  # = grid_scale(w)
        if scale_floor is not None:
            scale = torch.maximum(scale, scale_floor)
        if t is None:
            return fake_quantize(w, scale, qmin, qmax, axis), scale
        return clip_fake_quantize(w, t, scale, qmin, qmax, axis), scale

    def quantized_weight_bias(self, bn=None, input_quant=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The folded, quantized (weight, bias) used in inference and written by the export."""
        if not self.quant_enabled and not torch.is_grad_enabled():  # calibration's forward
            return self.float_weight_bias(bn)
        return self.quantized_weight_bias_scale(bn, input_quant)[:2]

    def quantized_weight_bias_scale(
        self, bn=None, input_quant=None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """:meth:`quantized_weight_bias` and the weight scale it used (``None`` when quantization is off)."""
        w, b = self.folded_weight_bias(bn)
        if not self.quant_enabled:
            return w, b, None
        bias_quant = b is not None and input_quant is not None and input_quant.quant_enabled
        s_in, qmin, qmax = input_quant.qparams() if bias_quant else (None, 0, 0)
        floor = self.bias_scale_floor(b, s_in) if bias_quant and self.learned_range is None else None
        wq, ws = self.quantize_weight(w, floor)
        if bias_quant:
            codes = torch.round(wq.detach() / (self._channel_view(ws) if ws.dim() else ws))
            room = accumulator_headroom(
                codes, self.weight_bits, input_quant.bits, max(-qmin, qmax), self.out_axis
            )
            b = quantize_bias(b, s_in * ws, room)
        return wq, b, ws

    @torch.no_grad()
    def bias_scale_floor(self, b: torch.Tensor, s_in: torch.Tensor) -> torch.Tensor:
        """The smallest weight scale whose bias step ``s_in · s_w`` holds the bias ``b`` in int32 (per output
        channel, or the largest for a per-tensor scale; a power of 2 when the scales are). A channel with
        near-zero weights (a BatchNorm gamma near 0) gets a per-channel scale too fine for its bias
        otherwise, above all with 16-bit activations; onnxruntime's quantizer raises it the same way
        (``_adjust_weight_scale_for_int32_bias``). Where the weights set a coarser scale it changes nothing."""
        f = b.detach().abs().float() / (s_in.float() * INT32_MAX)
        if not self.per_channel:
            f = f.max()
        if self.power2:
            f = torch.exp2(torch.ceil(torch.log2(f)))  # 0 stays 0
        return f

    def float_weight_bias(self, bn=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`folded_weight_bias` without gradients, folded again only when a tensor it reads has changed
        (another storage or an in-place update; an edit through ``.data`` is not seen: call
        :meth:`forget_float_weight_bias` after one). Calibration folds every layer once this way."""
        tensors = (self.weight, self.bias, self.bias_correction)
        if bn is not None:
            tensors += (bn.weight, bn.bias, bn.running_mean, bn.running_var)
        key = (id(bn), bn.eps if bn is not None else None) + tuple(
            (t.data_ptr(), t._version) if t is not None else None for t in tensors
        )
        cached = self.__dict__.get("_float_fold")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, *self.folded_weight_bias(bn))
            self.__dict__["_float_fold"] = cached
        return cached[1], cached[2]

    def forget_float_weight_bias(self) -> None:
        """Drop what :meth:`float_weight_bias` keeps (the next call folds again)."""
        self.__dict__.pop("_float_fold", None)

    def layer_forward(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self, x: torch.Tensor, bn: nn.Module | None = None, input_quant: nn.Module | None = None
    ) -> torch.Tensor:
        learned = self.learned_range
        if learned is not None and self.training and self.quant_enabled and learned.initializing:
            with torch.no_grad():
                self.init_learned_range(self.folded_weight_bias(bn)[0])
        recompute = (
            torch.is_grad_enabled()
            and self.weight.requires_grad
            and self.weight.numel() >= RECOMPUTE_MIN_NUMEL
        )
        if bn is None or not bn.training:
            if recompute:
                w, b = checkpoint(self.quantized_weight_bias, bn, input_quant, use_reentrant=False)
            else:
                w, b = self.quantized_weight_bias(bn, input_quant)
            return self.layer_forward(x, w, b)
        c = self._channel_view(bn_scale(bn))
        w = fused_weight.train_weight(self, c) if self.quant_enabled else None  # keeps nothing weight-sized
        if w is None:
            w = checkpoint(self._train_weight, c, use_reentrant=False) if recompute else self._train_weight(c)
        y = self.layer_forward(x, w, self.bias)
        return bn(y)

    def _train_weight(self, c: torch.Tensor) -> torch.Tensor:
        """The weight of the BN-training forward: ``q(W·c) / c`` (``W`` where ``c == 0``)."""
        # conv(x, q(W·c)) / c == conv(x, q(W·c) / c): the per-channel division is done on the weights
        w = self.weight * c
        if self.quant_enabled:
            w = self.quantize_weight(w)[0]
        # a channel with γ = 0 (zero-initialized residual BN, pruned channels) outputs β whatever its conv
        # computes; it keeps its float weights, so its batch statistics are the float model's (no 0 / 0)
        dead = c == 0
        return torch.where(dead, self.weight, w / torch.where(dead, 1.0, c))


class QuantConv2d(_FoldedWeightMixin, nn.Conv2d):
    """``nn.Conv2d`` whose forward folds the following BatchNorm and fake-quantizes weights and bias."""

    @classmethod
    def _shell(cls, conv: nn.Conv2d) -> QuantConv2d:
        return cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
            device="meta",
        )

    def layer_forward(self, x, w, b):
        return self._conv_forward(x, w, b)


class QuantConvTranspose2d(_FoldedWeightMixin, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` (``groups=1``) whose forward folds the following BatchNorm and fake-quantizes
    weights and bias; its weight is ``[in, out, kH, kW]``, so BatchNorm and per-channel scales act on axis 1.
    The output size is the layer's own (``output_padding``; a call with ``output_size=`` stays float)."""

    out_axis = 1

    @classmethod
    def _shell(cls, deconv: nn.ConvTranspose2d) -> QuantConvTranspose2d:
        if deconv.groups != 1:
            raise ValueError(f"QuantConvTranspose2d: groups must be 1, got {deconv.groups}")
        return cls(
            deconv.in_channels,
            deconv.out_channels,
            deconv.kernel_size,
            deconv.stride,
            deconv.padding,
            deconv.output_padding,
            deconv.groups,
            deconv.bias is not None,
            deconv.dilation,
            deconv.padding_mode,
            device="meta",
        )

    def layer_forward(self, x, w, b):
        return F.conv_transpose2d(
            x, w, b, self.stride, self.padding, self.output_padding, self.groups, self.dilation
        )


class QuantLinear(_FoldedWeightMixin, nn.Linear):
    """``nn.Linear`` whose forward folds a following BatchNorm1d and fake-quantizes weights and bias."""

    @classmethod
    def _shell(cls, linear: nn.Linear) -> QuantLinear:
        return cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")

    def layer_forward(self, x, w, b):
        return F.linear(x, w, b)


QUANT_WEIGHT_LAYERS = (
    QuantConv2d,
    QuantConvTranspose2d,
    QuantLinear,
)  # every layer whose weights xnnq quantizes
