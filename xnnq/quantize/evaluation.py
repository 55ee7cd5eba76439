"""QuantTestModule: the same numerics, evaluation only."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..layers.pact2 import PACT2
from .wrapper import QuantBaseModule


class QuantTestModule(QuantBaseModule):
    """Evaluation-only wrapper with the numerics of :class:`QuantTrainModule`.

    Build it from the float model, load a QAT (or calibration) ``state_dict`` and evaluate or export;
    ranges are never updated. ``train()`` keeps it in eval mode.
    """

    def __init__(self, model: nn.Module, dummy_input: Any, **kwargs):
        super().__init__(model, dummy_input, **kwargs)
        for m in self.module.modules():
            if isinstance(m, PACT2):
                m.frozen = True
        self.train(False)

    def train(self, mode: bool = True):
        return super().train(False)
