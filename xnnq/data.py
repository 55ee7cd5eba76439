"""CIFAR-10 (JPEG, ImageFolder layout) loaded once into memory as uint8 tensors.

The shared data set is small (50k + 10k 32x32 images): decoding it once and keeping it as a
uint8 tensor makes every epoch, calibration pass and evaluation I/O-free. Augmentation (random crop
with 4-pixel padding, horizontal flip) runs on whole batches of tensors.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


def data_root() -> Path:
    """The shared data folder: ``$XNNQ_DATA``, else ``../shared/data`` from the current working directory.

    Never a path relative to the installed package: run from the repository root or set ``XNNQ_DATA``.
    """
    return Path(os.environ.get("XNNQ_DATA") or Path("..") / "shared" / "data").expanduser().resolve()


def cifar10_available() -> bool:
    """Whether the CIFAR-10 JPEG test split and the ResNet-20 weights are under :func:`data_root`."""
    root = data_root()
    return (root / "cifar10" / "test").is_dir() and (root / "weights" / "resnet20_cifar10jpg.pt").is_file()


def load_image_folder(
    folder: str | Path, limit: int | None = None, size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode an ImageFolder tree into ``(uint8 images N×3×H×W, int64 labels N)``.

    Classes are the sorted sub-folder names. ``size`` resizes (shorter side, then center crop) when the
    images do not share one size. ``limit`` keeps the first ``limit`` files in sorted order per class
    round-robin, so a small limit still covers every class.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist (set XNNQ_DATA or pass --data)")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{folder} holds no class sub-folders (expected ImageFolder layout <class>/<image>)")
    per_class = [
        sorted(f for f in (folder / c).iterdir() if f.suffix.lower() in IMG_EXTENSIONS) for c in classes
    ]
    files: list[tuple[Path, int]] = []
    depth = max(len(p) for p in per_class)
    for i in range(depth):  # round-robin so that a limit covers all classes
        for label, paths in enumerate(per_class):
            if i < len(paths):
                files.append((paths[i], label))
    if limit is not None:
        files = files[:limit]
    images = []
    for path, _ in files:
        img = Image.open(path).convert("RGB")
        if size is not None and img.size != (size, size):
            scale = size / min(img.size)
            img = img.resize((max(size, round(img.size[0] * scale)), max(size, round(img.size[1] * scale))))
            left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
            img = img.crop((left, top, left + size, top + size))
        images.append(np.asarray(img, dtype=np.uint8))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    y = torch.tensor([label for _, label in files], dtype=torch.int64)
    return x, y


_CACHE: dict[tuple[str, int | None], tuple[torch.Tensor, torch.Tensor]] = {}


def cifar10(split: str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 ``split`` ("train" or "test") from the shared data as uint8 images and labels (cached)."""
    key = (split, limit)
    if key not in _CACHE:
        _CACHE[key] = load_image_folder(data_root() / "cifar10" / split, limit=limit)
    return _CACHE[key]


def normalize(x_uint8: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    """uint8 N×3×H×W → normalized float, as ``ToTensor()`` + ``Normalize(mean, std)``."""
    x = x_uint8.float().div_(255.0)
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def augment(x_uint8: torch.Tensor, generator: torch.Generator | None = None, pad: int = 4) -> torch.Tensor:
    """Random crop (zero padding ``pad``) and horizontal flip of a uint8 batch."""
    n, _, h, w = x_uint8.shape
    padded = torch.nn.functional.pad(x_uint8, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = dy.view(n, 1) + torch.arange(h).view(1, h)  # n×h
    cols = dx.view(n, 1) + torch.arange(w).view(1, w)  # n×w
    out = padded[
        torch.arange(n).view(n, 1, 1, 1),
        torch.arange(3).view(1, 3, 1, 1),
        rows.view(n, 1, h, 1),
        cols.view(n, 1, 1, w),
    ]
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def batches(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    *,
    shuffle: bool = False,
    train_augment: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield normalized ``(x, y)`` batches from uint8 images."""
    n = images.shape[0]
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for i in range(0, n, batch_size):
        idx = order[i : i + batch_size]
        xb = images[idx]
        if train_augment:
            xb = augment(xb, generator)
        yield normalize(xb.to(device)), labels[idx].to(device)


class Batches:
    """Re-iterable, sized :func:`batches`: each pass draws a new shuffle and augmentation from ``generator``.

    What :func:`xnnq.recipes.qat_finetune` takes as ``train_batches`` (``len()`` = batches per epoch).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        train_augment: bool = False,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.shuffle, self.train_augment, self.generator, self.device = (
            shuffle,
            train_augment,
            generator,
            device,
        )

    def __len__(self) -> int:
        return (self.images.shape[0] + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return batches(
            self.images,
            self.labels,
            self.batch_size,
            shuffle=self.shuffle,
            train_augment=self.train_augment,
            generator=self.generator,
            device=self.device,
        )


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 500,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> float:
    """Top-1 accuracy in percent of ``model`` (put in eval mode by the caller) on uint8 ``images``."""
    correct = 0
    it = batches(images, labels, batch_size, device=device)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, total=(len(labels) + batch_size - 1) // batch_size, desc="eval", leave=False)
    for x, y in it:
        correct += (model(x).argmax(1) == y).sum()
    return float(correct) * 100.0 / len(labels)
