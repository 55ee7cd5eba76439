"""Cross-layer equalization (CLE) with high-bias absorption (HBA), after Nagel et al., ICCV 2019 ("DFQ").

For each pair ``conv1 → [BN] → [ReLU/PReLU/Identity] → conv2`` (see :mod:`xnnq.utils.graph_pairs`) the
output channel i of conv1 is divided by s_i and the input channel i of conv2 multiplied by s_i, with
s_i = sqrt(r1_i / r2_i) (r = per-channel max |w| of the BN-folded kernels), so both get the range
sqrt(r1_i · r2_i). Positive homogeneity of the activation keeps the function. Grouped and depthwise
conv2: input channel i of conv2 is in-group channel ``i % (C / groups)`` of the output channels of group
``i // (C / groups)``; r2_i is the max over exactly those, and they are the ones rescaled.

**What it operates on.** The graph as it is: when conv1 is followed by a BatchNorm the scaling goes into
the BN's γ and β (conv1 is untouched) and r1 is measured on the BN-folded kernel; otherwise into conv1's
weight and bias. For re-parameterized networks the intended flow is ``reparameterize`` (one conv per
block) → :func:`~xnnq.utils.bn_restore.model_restore_bn` (an identity BN with the measured statistics
after each conv) → :func:`cross_layer_equalize`; the quantizer folds the BNs back.

**HBA.** A BN gives each channel's pre-activation distribution: mean β, std |γ| (after the scaling, so
consistent with it). With c = max(0, β − 3|γ|), β -= c and conv2's bias += Σ W2·c. Exact where
act(x − c) + c = act(x), i.e. for pre-activations ≥ c. A constant shift of conv2's input is only a bias
when conv2 has no zero padding (1x1 convs, linear layers): padded conv2s are skipped unless
``hba_padded=True`` (then the border outputs change).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..layers.bn_fold import bn_scale
from .graph_pairs import LayerPair, find_layer_pairs


def _bn_scale(bn: nn.Module | None, like: torch.Tensor) -> torch.Tensor:
    """Per-channel factor γ / sqrt(var + eps) that folding ``bn`` puts on a kernel (1 without BN)."""
    if bn is None:
        return torch.ones(like.shape[0], dtype=like.dtype, device=like.device)
    return bn_scale(bn)


def _channel_ranges_out(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """max |w| per output channel of the folded kernel ``weight * scale``."""
    return weight.flatten(1).abs().amax(1) * scale.abs()


def _channel_ranges_in(weight: torch.Tensor, groups: int, scale: torch.Tensor) -> torch.Tensor:
    """max |w| per *input channel of the layer before* (C = groups × in-group channels), folded kernel."""
    w = (
        (weight.abs() * scale.abs().view(-1, *([1] * (weight.dim() - 1)))).flatten(2).amax(2)
        if weight.dim() > 2
        else weight.abs() * scale.abs().view(-1, 1)
    )
    o, per_group = w.shape
    return w.view(groups, o // groups, per_group).amax(1).reshape(groups * per_group)


def _in_channel_map(weight: torch.Tensor, groups: int, per_channel: torch.Tensor) -> torch.Tensor:
    """Expand a vector over the C input channels of a (grouped) layer to its weight layout (O, C/groups, 1...)."""
    o, per_group = weight.shape[0], weight.shape[1]
    m = per_channel.view(groups, 1, per_group).expand(groups, o // groups, per_group).reshape(o, per_group)
    return m.view(o, per_group, *([1] * (weight.dim() - 2)))


def _groups(layer: nn.Module) -> int:
    return getattr(layer, "groups", 1)


def _check_pair(pair: LayerPair, conv1: nn.Module, bn1: nn.Module | None, conv2: nn.Module) -> bool:
    c = conv1.weight.shape[0]
    if conv2.weight.shape[1] * _groups(conv2) != c:
        raise ValueError(
            f"{pair.conv1} has {c} output channels but {pair.conv2} takes "
            f"{conv2.weight.shape[1] * _groups(conv2)}: the graph is not a chain of these layers"
        )
    # a BN without affine parameters or running statistics cannot carry the scaling
    return bn1 is None or (bn1.affine and bn1.running_var is not None)


@torch.no_grad()
def equalize_pair(
    model: nn.Module, pair: LayerPair, threshold: float, max_scale: float
) -> torch.Tensor | None:
    """Equalize one pair in place; returns the scales s (None when the pair cannot be rescaled)."""
    conv1, conv2 = model.get_submodule(pair.conv1), model.get_submodule(pair.conv2)
    bn1 = model.get_submodule(pair.bn1) if pair.bn1 else None
    bn2 = model.get_submodule(pair.bn2) if pair.bn2 else None
    if not _check_pair(pair, conv1, bn1, conv2):
        return None
    w1, w2, g2 = conv1.weight, conv2.weight, _groups(conv2)
    r1 = _channel_ranges_out(w1, _bn_scale(bn1, w1))
    r2 = _channel_ranges_in(w2, g2, _bn_scale(bn2, w2))
    s = torch.sqrt(r1 / r2.clamp_min(torch.finfo(r2.dtype).tiny)).clamp(1.0 / max_scale, max_scale)
    dead = (r1 <= threshold * r1.max()) | (r2 <= threshold * r2.max())
    s = torch.where(dead, torch.ones_like(s), s)
    if bn1 is not None:
        bn1.weight.div_(s)
        bn1.bias.div_(s)
    else:
        w1.div_(s.view(-1, *([1] * (w1.dim() - 1))))
        if conv1.bias is not None:
            conv1.bias.div_(s)
    w2.mul_(_in_channel_map(w2, g2, s))
    return s


@torch.no_grad()
def absorb_high_bias(model: nn.Module, pair: LayerPair, hba_padded: bool = False) -> torch.Tensor | None:
    """High-bias absorption on one pair in place; returns the absorbed c (None when not applicable)."""
    if pair.bn1 is None:
        return None
    bn1, conv2 = model.get_submodule(pair.bn1), model.get_submodule(pair.conv2)
    if not bn1.affine:
        return None
    padding = getattr(conv2, "padding", 0)
    padded = padding == "same" or (isinstance(padding, tuple) and any(p != 0 for p in padding))
    if padded and not hba_padded:
        return None
    c = (bn1.bias - 3 * bn1.weight.abs()).clamp_min(0.0)
    w2 = conv2.weight
    wsum = w2.flatten(2).sum(2) if w2.dim() > 2 else w2
    shift = (wsum * _in_channel_map(wsum, _groups(conv2), c)).sum(1)
    bn1.bias.sub_(c)
    if conv2.bias is None:
        conv2.bias = nn.Parameter(torch.zeros(w2.shape[0], dtype=w2.dtype, device=w2.device))
    conv2.bias.add_(shift)
    return c


def _run(model: nn.Module, dummy_input: Any) -> torch.Tensor:
    out = model(*dummy_input) if isinstance(dummy_input, tuple) else model(dummy_input)
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def cross_layer_equalize(
    model: nn.Module,
    dummy_input: Any,
    *,
    iterations: int = 2,
    threshold: float = 1e-6,
    max_scale: float = 1e3,
    hba: bool = True,
    hba_padded: bool = False,
) -> nn.Module:
    """Cross-layer equalization (and high-bias absorption) of ``model`` in place; returns ``model``.

    ``iterations`` sweeps over all pairs (a layer in two pairs is rescaled by both, so sweeps converge
    towards equal ranges). Scales are clamped to [1/max_scale, max_scale]; a channel whose range is at
    most ``threshold`` × the largest range of its layer (on either side) keeps s = 1, so dead channels
    are not blown up. ``hba`` then absorbs high biases where a BatchNorm gives the statistics (see the
    module docstring; ``hba_padded`` also absorbs into zero-padded convs, approximately at borders).

    ``dummy_input`` (a tensor or a tuple of inputs) checks in eval mode that the equalization kept the
    function (relative error ≤ 1e-3, else RuntimeError naming the problem). Use eval-mode BN statistics
    (e.g. after ``model_restore_bn``); the model keeps its train/eval mode.
    """
    if iterations < 1:
        raise ValueError(f"cross_layer_equalize: iterations must be >= 1, got {iterations}")
    was_training = model.training
    model.eval()
    try:
        reference = _run(model, dummy_input)
        pairs = find_layer_pairs(model)
        for _ in range(iterations):
            for pair in pairs:
                equalize_pair(model, pair, threshold, max_scale)
        out = _run(model, dummy_input)
        err = float((out - reference).abs().max() / reference.abs().max().clamp_min(1e-12))
        if not err <= 1e-3:
            raise RuntimeError(
                f"cross_layer_equalize changed the output of {type(model).__name__} by {err:.3g} "
                "(relative): the model has a layer between a pair that is not positive-homogeneous "
                "or uses a module twice; please report it with the model"
            )
        if hba:
            for pair in pairs:
                absorb_high_bias(model, pair, hba_padded)
    finally:
        model.train(was_training)
    return model
