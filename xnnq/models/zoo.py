"""Registry of xnnq's small networks (CIFAR-10 classifiers, the Mosaic-10 detector and segmenter) and their
committed checkpoints.

``get_model(name)`` builds a network in its training form; ``load_pretrained(name)`` also loads the
state dict committed in ``xnnq/models/checkpoints/<name>.pt`` (read with ``weights_only=True``), whose
accuracy, epochs and training time are in ``<name>.json`` (``checkpoint_info(name)``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch.nn as nn

from ..utils.io import load_state_dict_file
from .detector import mosaic_detector
from .mobilenetv1 import mobilenetv1_cifar
from .mobileone import mobileone_cifar
from .qarepvgg import qarepvgg_cifar
from .repvgg import repvgg_cifar
from .segmenter import mosaic_segmenter

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"

MODELS: dict[str, Callable[[], nn.Module]] = {
    "repvgg": repvgg_cifar,
    "qarepvgg": qarepvgg_cifar,
    "mobileone": mobileone_cifar,
    "mobilenetv1": mobilenetv1_cifar,
    "mosaic_detector": mosaic_detector,  # SSD detector for Mosaic-10 (scripts/train_detector.py)
    "mosaic_segmenter": mosaic_segmenter,  # UNet/DeepLabV3-lite for Mosaic-10 (scripts/train_segmenter.py)
}


def _train_command(name: str) -> str:
    if name == "mosaic_detector":
        return "scripts/train_detector.py --save"
    if name == "mosaic_segmenter":
        return "scripts/train_segmenter.py --save"
    return f"scripts/train_cifar.py --model {name} --save"


def get_model(name: str) -> nn.Module:
    """A freshly initialised network ``name`` (one of :data:`MODELS`) in training form."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}: choose one of {sorted(MODELS)}")
    return MODELS[name]()


def checkpoint_path(name: str) -> Path:
    """Where the committed state dict of ``name`` lives."""
    return CHECKPOINTS / f"{name}.pt"


def checkpoint_info(name: str) -> dict:
    """The JSON record (test accuracy, epochs, seconds, ...) saved next to the checkpoint of ``name``."""
    path = CHECKPOINTS / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint record {path}: train it with {_train_command(name)}")
    return json.loads(path.read_text())


def load_pretrained(name: str) -> nn.Module:
    """Network ``name`` with its committed weights (training form, eval mode)."""
    path = checkpoint_path(name)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint {path}: train it with {_train_command(name)}")
    model = get_model(name)
    model.load_state_dict(load_state_dict_file(path))
    return model.eval()
