"""Model and data loading for the ``xnnq`` command line: ``resnet20``, a torchvision name or
``module:attr``."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import torch
from torch import nn

from .. import data
from ..models import zoo
from ..models.cifar_resnet import resnet20
from ..utils.io import load_state_dict_file
from .errors import CliError


def _call_factory(factory, num_classes: int | None, what: str) -> nn.Module:
    kwargs = {}
    try:
        if num_classes is not None and "num_classes" in inspect.signature(factory).parameters:
            kwargs["num_classes"] = num_classes
    except (TypeError, ValueError):
        pass
    model = factory(**kwargs)
    if not isinstance(model, nn.Module):
        raise CliError(f"--model {what}: calling it gave a {type(model).__name__}, not a torch.nn.Module")
    return model


def build_model(spec: str, num_classes: int | None = None) -> nn.Module:
    """``resnet20`` (CIFAR), any ``torchvision.models`` name (random init), or ``package.module:attr``
    (a module instance, a class or a function returning one; ``num_classes`` is passed if it takes it)."""
    if spec == "resnet20":
        return resnet20(num_classes or 10)
    if spec in zoo.MODELS:
        if num_classes is not None:
            raise CliError(
                f"--model {spec}: xnnq's {spec} has a fixed number of classes; leave out --num-classes"
            )
        return zoo.get_model(spec)
    if ":" in spec:
        mod_name, _, attr = spec.partition(":")
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:
            raise CliError(
                f"--model {spec}: cannot import module {mod_name!r} ({e}). Put it on PYTHONPATH."
            ) from e
        obj = getattr(mod, attr, None)
        if obj is None:
            raise CliError(f"--model {spec}: module {mod_name!r} has no attribute {attr!r}")
        return obj if isinstance(obj, nn.Module) else _call_factory(obj, num_classes, spec)
    import torchvision

    names = torchvision.models.list_models()
    if spec not in names:
        close = [n for n in names if spec.lower() in n][:8]
        raise CliError(
            f"--model {spec!r} is not 'resnet20', a torchvision model name or 'module:attr'"
            + (f"; did you mean one of {close}?" if close else "; see torchvision.models.list_models()")
        )
    kwargs = {"num_classes": num_classes} if num_classes is not None else {}
    if "weights_backbone" in inspect.signature(torchvision.models.get_model_builder(spec)).parameters:
        kwargs["weights_backbone"] = None  # random init throughout: nothing is downloaded
    return torchvision.models.get_model(spec, weights=None, **kwargs)


def load_model(spec: str, weights: str | None, num_classes: int | None) -> nn.Module:
    """Build ``spec`` and load ``weights`` (a state dict file, read with ``weights_only=True``); eval mode."""
    if weights and num_classes is None:
        model = build_model(spec)
    else:
        model = build_model(spec, num_classes)
    if weights:
        path = Path(weights)
        if not path.is_file():
            raise CliError(f"--weights {weights}: no such file")
        try:
            sd = load_state_dict_file(path)
        except ValueError as e:
            raise CliError(f"--weights: {e}") from e
        try:
            model.load_state_dict(sd)
        except RuntimeError as e:
            first = str(e).splitlines()
            raise CliError(
                f"--weights {weights} does not fit --model {spec}: {' '.join(first[:3])[:400]}"
            ) from e
    return model.eval()


def default_weights(spec: str) -> str | None:
    """The shared CIFAR-10 ResNet-20 checkpoint for ``resnet20`` when it is present, the committed checkpoint of
    one of xnnq's own networks (:mod:`xnnq.models.zoo`), else None."""
    if spec in zoo.MODELS:
        path = zoo.checkpoint_path(spec)
        return str(path) if path.is_file() else None
    path = data.data_root() / "weights" / "resnet20_cifar10jpg.pt"
    return str(path) if spec == "resnet20" and path.is_file() else None


def default_input_size(spec: str, folder: Path) -> int:
    """32 for resnet20, 224 for torchvision models, else (xnnq's own networks, ``module:attr``) the size of the
    first image in ``folder``."""
    if spec == "resnet20":
        return 32
    if ":" not in spec and spec not in zoo.MODELS:
        return 224
    from PIL import Image

    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() in data.IMG_EXTENSIONS:
            with Image.open(p) as img:
                return min(img.size)
    raise CliError(f"no images under {folder}")


def split_dirs(root: str | Path) -> tuple[Path, Path]:
    """(train, test) folders of an ImageFolder data set: ``root/train`` and ``root/test`` (or ``val``), or
    ``root`` for both."""
    root = Path(root)
    if not root.is_dir():
        raise CliError(
            f"--data {root}: no such directory (an ImageFolder tree: <class>/<image>, or train/ and test/)"
        )
    train = root / "train" if (root / "train").is_dir() else root
    test = next((root / s for s in ("test", "val", "validation") if (root / s).is_dir()), train)
    return train, test


def load_split(folder: Path, size: int, limit: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(uint8 images, labels, number of classes) from an ImageFolder ``folder``."""
    try:
        x, y = data.load_image_folder(folder, limit=limit, size=size)
    except (FileNotFoundError, ValueError) as e:
        raise CliError(str(e)) from e
    n_classes = sum(1 for p in folder.iterdir() if p.is_dir())
    if x.shape[-1] != size or x.shape[-2] != size:
        raise CliError(f"images in {folder} are {tuple(x.shape[-2:])}, expected {size}x{size}")
    return x, y, n_classes
