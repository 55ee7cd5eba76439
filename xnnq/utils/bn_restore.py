"""BN restore: put back a BatchNorm after the convs of a BN-folded (deploy-form) model.

The inserted BatchNorm has the statistics of the conv's output measured on calibration data, and
γ = sqrt(var + eps), β = mean, so it is the identity and the model computes the same function. Its
parameters then describe each channel's pre-activation distribution (mean β, standard deviation |γ|),
which is what cross-layer equalization's high-bias absorption and BN-aware QAT need.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn as nn

CONVS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN_FOR = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}


class _StatsProbe(nn.Module):
    """Runs ``conv`` and accumulates per-channel sums of its output (the statistics a BatchNorm in training
    mode would gather, whatever the mode) while passing the output on unchanged."""

    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv
        c, dev = conv.out_channels, conv.weight.device
        self.register_buffer("total", torch.zeros(c, dtype=torch.float64, device=dev))
        self.register_buffer("total_sq", torch.zeros(c, dtype=torch.float64, device=dev))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64, device=dev))
        self.register_buffer("batches", torch.zeros((), dtype=torch.long, device=dev))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        with torch.no_grad():
            dims = [d for d in range(y.dim()) if d != 1]
            y64 = y.detach().to(torch.float64)
            self.total += y64.sum(dims)
            self.total_sq += (y64 * y64).sum(dims)
            self.count += y.numel() / y.shape[1]
            self.batches += 1
        return y

    def restored(self, eps: float) -> nn.Sequential:
        """``Sequential(conv, bn)`` with the identity BatchNorm built from the gathered statistics."""
        n = float(self.count)
        if n < 2:
            raise ValueError(
                f"{self.conv}: saw {n:.0f} output values per channel during calibrate_func; "
                "make calibrate_func run the model on data that reaches it, or leave it out of layers="
            )
        mean = self.total / n
        var = (self.total_sq / n - mean * mean).clamp_min(0.0) * (n / (n - 1))  # unbiased, like BatchNorm
        w = self.conv.weight
        bn = _BN_FOR[type(self.conv)](self.conv.out_channels, eps=eps, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            bn.num_batches_tracked.copy_(self.batches)
            bn.weight.copy_(torch.sqrt(var + eps))
            bn.bias.copy_(mean)
        seq = nn.Sequential()
        seq.add_module("conv", self.conv)
        seq.add_module("bn", bn)
        return seq


def _chosen(model: nn.Module, layers: Iterable[str] | None) -> list[str]:
    convs = [name for name, m in model.named_modules() if isinstance(m, CONVS) and name]
    if layers is None:
        return convs
    names = list(layers)
    modules = dict(model.named_modules())
    for name in names:
        if name not in modules:
            raise KeyError(f"model_restore_bn: no module named {name!r} in the model")
        if not isinstance(modules[name], CONVS):
            raise TypeError(
                f"model_restore_bn: {name!r} is a {type(modules[name]).__name__}, not a Conv1d/2d/3d"
            )
    return names


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


@torch.no_grad()
def model_restore_bn(
    model: nn.Module,
    calibrate_func: Callable[[nn.Module], object],
    layers: Iterable[str] | None = None,
    eps: float = 1e-5,
) -> nn.Module:
    """Insert an identity BatchNorm with measured statistics after each chosen conv of ``model`` (in place).

    ``calibrate_func(model)`` runs forward passes on calibration data. During it every chosen conv (by
    qualified module name in ``layers``; default: every Conv1d/2d/3d) feeds its output to a probe that
    accumulates the statistics a BatchNorm in training mode gathers (mean, unbiased variance over batch and
    spatial positions), for the whole calibration set rather than a moving average, and whatever mode
    ``calibrate_func`` puts the model in. The probes pass the conv output on unchanged, so downstream
    statistics are those of the original model. The model runs in eval mode unless ``calibrate_func``
    changes it; the running statistics of BatchNorms already in the model are put back afterwards.

    Each conv ``name`` then becomes ``Sequential(conv=<the conv>, bn=BatchNorm)`` with running statistics
    (mean, var), γ = sqrt(var + eps) and β = mean: the BatchNorm is the identity in eval mode, so the
    model's function is unchanged. Returns ``model`` in its original train/eval mode.
    """
    names = _chosen(model, layers)
    if not names:
        raise ValueError("model_restore_bn: the model has no Conv1d/2d/3d to restore a BatchNorm after")
    was_training = model.training
    kept = {
        k: v.clone()
        for k, v in model.state_dict().items()
        if k.rpartition(".")[2] in ("running_mean", "running_var", "num_batches_tracked")
    }
    probes = {}
    for name in names:
        probes[name] = _StatsProbe(model.get_submodule(name))
        _set(model, name, probes[name])
    model.eval()
    try:
        calibrate_func(model)
        restored = {name: probe.restored(eps) for name, probe in probes.items()}
    except BaseException:
        for name, probe in probes.items():
            _set(model, name, probe.conv)
        raise
    finally:
        model.train(was_training)
        model.load_state_dict(kept, strict=False)  # calibrate_func in train mode must not move existing BNs
    for name, seq in restored.items():
        _set(model, name, seq)
    return model.train(was_training)


@torch.no_grad()
def fold_restored_bn(model: nn.Module) -> nn.Module:
    """Undo the structure of :func:`model_restore_bn` in place: every ``Sequential(conv=Conv, bn=BatchNorm)``
    becomes one biased conv with the BatchNorm (eval statistics, γ, β, possibly changed by CLE) folded in."""
    from ..layers.bn_fold import fold_bn

    for name, m in list(model.named_modules()):
        if (
            isinstance(m, nn.Sequential)
            and len(m) == 2
            and isinstance(getattr(m, "conv", None), CONVS)
            and isinstance(getattr(m, "bn", None), nn.modules.batchnorm._BatchNorm)
            and name
        ):
            conv = m.conv
            w, b = fold_bn(conv.weight, conv.bias, m.bn)
            if conv.bias is None:
                conv.bias = nn.Parameter(torch.zeros_like(b))
            conv.weight.copy_(w)
            conv.bias.copy_(b)
            _set(model, name, conv)
    return model
