"""The pipeline every wrapper shares: capture → surgery → plan → build."""

from __future__ import annotations

import copy
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from ..layers.pact2 import PACT2
from ..layers.tqt import LearnedRange
from . import surgery
from .build import build
from .capture import CaptureError, check_dummy_input, leaf_names_types, record_values, trace
from .config import QuantConfig
from .plan import Plan, float_weight_modules, make_plan


def convert(
    model: nn.Module,
    args: tuple[torch.Tensor, ...],
    leaf_modules: Iterable[str | type],
    report: list[surgery.Change],
    config: QuantConfig | None = None,
) -> tuple[fx.GraphModule, dict[fx.Node, Any]]:
    """Capture and surgery: ``model`` (changed: pass a copy) traced, run on ``args`` (every node's value
    kept) and converted as ``config`` asks; the graph the plan is made on."""
    gm = trace(model, leaf_modules)
    values = record_values(gm, args)
    surgery.run(gm, values, report, split_silu=config is not None and config.split_silu)
    return gm, values


def _warn_float_weights(gm: fx.GraphModule, plan: Plan, leaf_modules: tuple) -> None:
    """One warning naming the modules whose weights stay float (:func:`~xnnq.quantize.plan.float_weight_modules`),
    apart from the user's ``leaf_modules``."""
    names, types = leaf_names_types(leaf_modules)
    skip = names | {n for n, m in gm.named_modules() if types and isinstance(m, types)}
    found = float_weight_modules(gm, plan, skip)
    if not found:
        return
    listed = "; ".join(f"`{n}` ({t}: {', '.join(p[:3])}{', ...' if len(p) > 3 else ''})" for n, t, p in found)
    warnings.warn(
        f"xnnq quantizes the weights of Conv2d, Linear and ConvTranspose2d (groups=1, no output_size=) layers; "
        f"these run in float (modules the graph calls whole, functionals or torch.fx.wrap-ped functions given a "
        f"parameter) and their weights stay float in the export, outside what QAT "
        f"or calibration sees: {listed}. To quantize them, write them with nn.Conv2d / nn.Linear / "
        "nn.ConvTranspose2d modules and tensor ops torch.fx traces (e.g. attention as Linear, matmul, softmax).",
        RuntimeWarning,
        stacklevel=_caller_level(),
    )


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside xnnq (the user's line), seen from the caller."""
    package = str(Path(__file__).resolve().parents[1])
    frame, level = sys._getframe(1), 1
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


class QuantBaseModule(nn.Module):
    """Wraps a float model; ``.module`` is the transformed ``torch.fx.GraphModule``.

    Subclasses differ only in mode (training, calibration, test). The float model passed in is not
    modified (it is deep-copied before any change).

    Args:
        model: the float model.
        dummy_input: a tensor (or tuple of tensors) shaped like one input batch.
        config: a :class:`~xnnq.quantize.config.QuantConfig`; keyword ``settings`` (its field names, e.g.
            ``bitwidth_weights=16``) replace its fields (or the defaults when it is not given).
        leaf_modules: submodule names or types kept opaque to tracing (they run in float).
        verbose: print the surgery report.
    """

    module: fx.GraphModule

    def __init__(
        self,
        model: nn.Module,
        dummy_input: Any,
        config: QuantConfig | None = None,
        *,
        leaf_modules: Iterable[str | type] = (),
        verbose: bool = False,
        **settings: Any,
    ):
        super().__init__()
        if isinstance(model, QuantBaseModule) or any(isinstance(m, PACT2) for m in model.modules()):
            raise TypeError(
                f"the model is already wrapped/quantized by xnnq ({type(model).__name__}); wrap the float "
                "model once. To test a QAT model use QuantTestModule(float_model, dummy_input) and load "
                "the QAT state_dict into it."
            )
        self.config: QuantConfig = QuantConfig.from_settings(config, **settings)
        self.target: str | None = self.config.target
        args = check_dummy_input(dummy_input)
        float_model = copy.deepcopy(model)
        param = next(float_model.parameters(), None)
        if param is not None:
            args = tuple(a.to(param.device) for a in args)
        self.leaf_modules = tuple(leaf_modules)
        self.report: list[surgery.Change] = []
        gm, values = convert(float_model, args, self.leaf_modules, self.report, self.config)
        self.plan: Plan = make_plan(gm, values, self.config)
        _warn_float_weights(gm, self.plan, self.leaf_modules)
        build(gm, self.plan, self.report, self.config)
        gm.delete_all_unused_submodules()
        self.module = gm
        self.dummy_shapes = [tuple(a.shape) for a in args]
        self.bn_frozen = False
        QuantBaseModule.train(self, model.training)  # the subclass sets its own mode when it is built
        if verbose:
            print(self.surgery_report())

    # --------------------------------------------------------------------------------- interface
    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def surgery_report(self) -> str:
        """Every change made to the float model, one per line."""
        return "\n".join(str(c) for c in self.report)

    def get_extra_state(self) -> dict[str, Any]:
        return {"bn_frozen": self.bn_frozen, "split_silu": self.config.split_silu}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.bn_frozen = bool(state["bn_frozen"])
        self.train(self.training)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        saved = state_dict.get(prefix + "_extra_state")
        split = saved.get("split_silu") if isinstance(saved, dict) else None
        if strict and split is not None and split != self.config.split_silu:
            own = {prefix + k for k in self.state_dict()}
            if own != set(state_dict):  # the model has SiLUs, quantized one way there and the other here
                how = "x * sigmoid(x) with sigma(x) quantized" if split else "one quantizer per SiLU"
                raise ValueError(
                    f"{type(self).__name__}: the state dict was saved with its SiLUs quantized as {how}; build "
                    f"this wrapper with silu={'sigmoid_mul' if split else 'fused'!r}, as the one that saved it."
                )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    def train(self, mode: bool = True):
        """Set train/eval mode. Never changes frozen ranges; BatchNorm stays frozen after ``freeze_bn``."""
        super().train(mode)
        if self.bn_frozen:
            for m in self.module.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.train(False)
        return self

    def float_reference(self, float_model: nn.Module) -> fx.GraphModule:
        """``float_model`` (copied) traced and converted as this wrapper was (same ``leaf_modules``, inputs
        of the dummy input's shapes), in eval mode on the wrapper's device: the float graph whose node names
        are the plan's (:attr:`ActSpot.tensor <xnnq.quantize.plan.ActSpot>` is the float counterpart of a
        quantizer)."""
        device = next(self.parameters()).device
        model = copy.deepcopy(float_model).to(device).eval()
        dummy = tuple(torch.randn(s, device=device) for s in self.dummy_shapes)
        gm, _ = convert(model, dummy, self.leaf_modules, [], self.config)
        return gm.eval()

    def quantizers(self) -> dict[str, PACT2]:
        """The activation quantizers by module path."""
        return {n: m for n, m in self.module.named_modules() if isinstance(m, PACT2)}

    def learned_ranges(self) -> dict[str, LearnedRange]:
        """The learned thresholds (``range_learning="tqt"``) by the path of their quantizer or layer."""
        mods = self.module.named_modules()
        return {n.rpartition(".")[0]: m for n, m in mods if isinstance(m, LearnedRange)}

    def range_parameters(self) -> list[nn.Parameter]:
        """The learned log2 thresholds (empty unless ``range_learning`` learns them), for their own parameter
        group: e.g. ``torch.optim.Adam(qmodel.range_parameters(), lr=1e-2)`` beside the weights' optimizer
        over :meth:`non_range_parameters` (no weight decay on thresholds)."""
        return [m.log2_t for m in self.learned_ranges().values()]

    def non_range_parameters(self) -> list[nn.Parameter]:
        """Every parameter except :meth:`range_parameters` (the model's own weights, biases, BN affine...)."""
        ranges = {id(p) for p in self.range_parameters()}
        return [p for p in self.parameters() if id(p) not in ranges]


__all__ = ["QuantBaseModule", "CaptureError"]
