"""The pipeline every wrapper shares: capture → surgery → plan → build."""
from __future__ import annotations

import copy
from typing import Any, Iterable

import torch.fx as fx
from torch import nn

from ..layers.pact2 import PACT2
from ..targets import resolve_numerics
from . import surgery
from .build import build
from .capture import CaptureError, check_dummy_input, record_values, trace
from .plan import Plan, make_plan


class QuantBaseModule(nn.Module):
    """Wraps a float model; ``.module`` is the transformed ``torch.fx.GraphModule``.

    Subclasses differ only in mode (training, calibration, test). The float model passed in is not
    modified (it is deep-copied before any change).
    """

    module: fx.GraphModule

    def __init__(self, model: nn.Module, dummy_input: Any, *, bitwidth_weights: int = 8, bitwidth_activations: int = 8,
                 per_channel_q: bool | str | None = None, power2_weight_range: bool | None = None,
                 power2_activation_range: bool | None = None, target: str | None = None, constrain_weights: bool = True,
                 bitwidth_overrides: dict[str, int] | None = None, leaf_modules: Iterable[str | type] = (),
                 histogram_tail: float = 1e-4, ema_alpha: float = 0.01, clip_ranges: dict[str, float] | None = None,
                 verbose: bool = False, act_factory=None):
        super().__init__()
        # numerics left as None follow the TIDL target (xnnq/targets.py), or today's defaults without one
        num = resolve_numerics(target, per_channel_q=per_channel_q, power2_weight_range=power2_weight_range,
                               power2_activation_range=power2_activation_range)
        per_channel_q, power2_weight_range, power2_activation_range = (
            num["per_channel_q"], num["power2_weight_range"], num["power2_activation_range"])
        self.target: str | None = num["target"]
        if isinstance(model, QuantBaseModule) or any(isinstance(m, PACT2) for m in model.modules()):
            raise TypeError(f"the model is already wrapped/quantized by xnnq ({type(model).__name__}); wrap the float "
                            "model once. To test a QAT model use QuantTestModule(float_model, dummy_input) and load "
                            "the QAT state_dict into it.")
        args = check_dummy_input(dummy_input)
        float_model = copy.deepcopy(model)
        param = next(float_model.parameters(), None)
        if param is not None:
            args = tuple(a.to(param.device) for a in args)
        gm = trace(float_model, leaf_modules)
        values = record_values(gm, args)
        self.report: list[surgery.Change] = []
        surgery.run(gm, values, self.report)
        self.plan: Plan = make_plan(gm, values, bitwidth_weights=bitwidth_weights,
                                    bitwidth_activations=bitwidth_activations, per_channel_q=per_channel_q,
                                    bitwidth_overrides=bitwidth_overrides)
        build(gm, self.plan, self.report, power2_weight_range=power2_weight_range,
              power2_activation_range=power2_activation_range, constrain_weights=constrain_weights,
              tail=histogram_tail, ema_alpha=ema_alpha, clip_ranges=clip_ranges, act_factory=act_factory)
        gm.delete_all_unused_submodules()
        self.module = gm
        self.dummy_shapes = [tuple(a.shape) for a in args]
        self.bn_frozen = False
        self.train(model.training)
        if verbose:
            print(self.surgery_report())

    # --------------------------------------------------------------------------------- interface
    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def surgery_report(self) -> str:
        """Every change made to the float model, one per line."""
        return "\n".join(str(c) for c in self.report)

    def get_extra_state(self) -> dict[str, Any]:
        return {"bn_frozen": self.bn_frozen}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.bn_frozen = bool(state["bn_frozen"])
        self.train(self.training)

    def train(self, mode: bool = True):
        """Set train/eval mode. Never changes frozen ranges; BatchNorm stays frozen after ``freeze_bn``."""
        super().train(mode)
        if self.bn_frozen:
            for m in self.module.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.train(False)
        return self

    def quantizers(self) -> dict[str, PACT2]:
        """The activation quantizers by module path."""
        return {n: m for n, m in self.module.named_modules() if isinstance(m, PACT2)}


__all__ = ["QuantBaseModule", "CaptureError"]
