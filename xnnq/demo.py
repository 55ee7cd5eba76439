"""``xnnq demo``: the whole flow on a small CNN, with no data or weights.

A small CNN learns to tell four orientations of noisy coloured gratings (generated here), then QAT,
export in both ONNX formats, an onnxruntime check of each against PyTorch, and the per-layer analysis.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import data
from .cli.steps import check_onnx, export_both, write_analysis
from .quantize import QuantTrainModule
from .recipes import qat_finetune

CLASSES = ("horizontal", "diagonal", "vertical", "anti-diagonal")


class TinyCNN(nn.Module):
    """Three conv+BN+ReLU stages, global average pooling and a linear classifier (about 15k parameters)."""

    def __init__(self, num_classes: int = 4, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def tiny_cnn(num_classes: int = 4) -> TinyCNN:
    """Factory for ``--model xnnq.demo:tiny_cnn``."""
    return TinyCNN(num_classes)


def gratings(n: int, size: int = 16, seed: int = 0, noise: float = 0.6) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` uint8 images (N×3×size×size) of noisy coloured gratings; label = orientation (0/45/90/135°)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(CLASSES), (n,), generator=g)
    angle = labels.float() * (math.pi / 4) + (torch.rand(n, generator=g) - 0.5) * 0.3
    freq = 2 * math.pi * (1.5 + 2.0 * torch.rand(n, generator=g)) / size
    phase = 2 * math.pi * torch.rand(n, generator=g)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    proj = xx * torch.sin(angle).view(n, 1, 1) + yy * torch.cos(angle).view(n, 1, 1)
    wave = torch.sin(freq.view(n, 1, 1) * proj + phase.view(n, 1, 1))
    colour = 0.3 + 0.7 * torch.rand(n, 3, 1, 1, generator=g)
    img = 0.5 + 0.35 * colour * wave.unsqueeze(1) + noise * torch.randn(n, 3, size, size, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8), labels


def train_float(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int = 3,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
) -> nn.Module:
    """Plain float training with Adam."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    steps = epochs * ((len(labels) + batch_size - 1) // batch_size)
    with tqdm(total=steps, desc="float training", disable=not progress) as bar:
        for _ in range(epochs):
            for x, y in data.batches(images, labels, batch_size, shuffle=True, generator=gen):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                opt.step()
                bar.update()
    return model.eval()


def run_demo(
    out: Path,
    *,
    train_images: int = 2048,
    test_images: int = 512,
    epochs: int = 3,
    qat_epochs: float = 1.0,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Train, QAT, export, check and analyze; write everything to ``out`` and return the summary."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    x_tr, y_tr = gratings(train_images, seed=seed)
    x_te, y_te = gratings(test_images, seed=seed + 1)
    dummy = torch.randn(1, 3, 16, 16)
    model = train_float(TinyCNN(len(CLASSES)), x_tr, y_tr, epochs=epochs, seed=seed, progress=progress)
    float_acc = data.evaluate(model, x_te, y_te)
    train = data.Batches(x_tr, y_tr, 64, shuffle=True, generator=torch.Generator().manual_seed(seed))
    q = qat_finetune(QuantTrainModule(model, dummy), train, epochs=qat_epochs, lr=5e-3, progress=progress)
    qat_acc = data.evaluate(q, x_te, y_te)
    torch.save(model.state_dict(), out / "float_weights.pt")
    paths = export_both(q, dummy, out, stem="demo", progress=progress)
    onnx = check_onnx(paths, q, x_te, y_te, progress=progress)
    analysis = write_analysis(
        q, model, x_te[:256], y_te[:256], out / "analysis", sensitivity_batches=2, progress=progress
    )
    summary = {
        "float_accuracy": float_acc,
        "qat_accuracy": qat_acc,
        "onnx": onnx,
        "analysis": analysis,
        "test_images": test_images,
        "seconds": round(time.perf_counter() - t0, 1),
        "out": str(out),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def format_summary(s: dict[str, Any]) -> str:
    """The demo's closing summary, a few lines of text."""
    lines = [
        f"xnnq demo — synthetic 4-class gratings, {s['test_images']} test images, {s['seconds']} s",
        f"  float accuracy        {s['float_accuracy']:6.2f} %",
        f"  QAT (8-bit) accuracy  {s['qat_accuracy']:6.2f} %",
    ]
    for fmt, r in s["onnx"].items():
        lsb = f", max diff {r['max_lsb_diff']:.2f} LSB" if r.get("max_lsb_diff") is not None else ""
        lines.append(
            f"  ONNX {fmt:4s} onnxruntime {r['accuracy']:6.2f} %, top-1 agreement with PyTorch "
            f"{r['top1_agreement_pct']:.2f} %{lsb}  ({r['path']})"
        )
    a = s["analysis"]
    lines.append(f"  most sensitive layers {', '.join(a['most_sensitive'][:3])}; report {a['report']}")
    return "\n".join(lines)
