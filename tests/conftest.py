"""Shared test set-up: seeding, the shared-data skip, and the small nets and helpers several test files use.

Property tests (hypothesis) draw the same examples on every run (profile ``default``: derandomized), so a
clean checkout passes or fails the same way each time; ``HYPOTHESIS_PROFILE=explore pytest tests/test_properties.py``
draws new random examples to look for failures, which then go in as explicit ``@example`` cases.

Test modules import the helpers with ``from conftest import ...`` (pytest puts ``tests/`` on ``sys.path``).
The shared data folder is :func:`xnnq.data.data_root` (``$XNNQ_DATA``, default ``../shared/data`` from the
working directory); tests marked ``data`` are skipped, with the reason, when it is absent.
"""

from __future__ import annotations

import datetime
import os
import sys
from collections.abc import Iterable

import numpy as np
import pytest
import torch
from torch import nn

from xnnq import data

try:
    from hypothesis import settings as _hypothesis_settings
except ImportError:  # the dev extra is not installed: the property tests are not collected either
    _hypothesis_settings = None
else:
    _hypothesis_settings.register_profile("default", derandomize=True, database=None)
    _hypothesis_settings.register_profile("explore", derandomize=False)
    _hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if data.cifar10_available():
        return
    skip = pytest.mark.skip(
        reason=f"needs the shared CIFAR-10 data and weights under {data.data_root()} "
        "(set XNNQ_DATA); not present on this machine"
    )
    for item in items:
        if "data" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fused_mode():
    """``xnnq.layers.fused.set_fused`` for a test that flips the process-wide switch; restored afterwards."""
    from xnnq.layers import fused

    before = fused._state["mode"]
    yield fused.set_fused
    fused.set_fused(before)


# ------------------------------------------------------------------------------------------ small nets
def tiny_convnet(num_classes: int = 4, dropout: float = 0.0) -> nn.Sequential:
    """Conv-BN-ReLU, strided conv-BN-ReLU6, global pool, (dropout), linear; 8x8 inputs are enough."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    ]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(16, num_classes))
    return nn.Sequential(*layers)


def conv_act_conv(*acts: nn.Module, width: int = 8, out: int = 4) -> nn.Sequential:
    """3x3 conv, then each activation in ``acts`` followed by a 1x1 conv (the last one to ``out`` channels):
    a small net for one activation's export."""
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1)]
    for i, act in enumerate(acts):
        layers += [act, nn.Conv2d(width, out if i == len(acts) - 1 else width, 1)]
    return nn.Sequential(*layers)


def randomize_bn(model: nn.Module, seed: int = 0, gamma: tuple[float, float] = (-1.5, 1.5)) -> nn.Module:
    """Non-trivial BN statistics and affine parameters (so that folding errors show), the BN weight uniform
    in ``gamma``; eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            for t, lo, hi in (
                (m.running_mean, -1, 1),
                (m.running_var, 0.2, 3),
                (m.weight.data, *gamma),
                (m.bias.data, -0.5, 0.5),
            ):
                t.copy_(torch.empty(t.shape).uniform_(lo, hi, generator=g))
    return model.eval()


# --------------------------------------------------------------------------------------------- helpers
def observe(qmodel: nn.Module, batches: Iterable[torch.Tensor], *, bn_frozen: bool = False) -> nn.Module:
    """Forward passes in training mode without gradients (QAT range tracking or PTQ calibration), then
    ``eval()``; ``bn_frozen`` freezes BatchNorm first so that the folded weights are the eval ones."""
    from xnnq.utils import freeze_bn

    qmodel.train()
    if bn_frozen:
        freeze_bn(qmodel)
    with torch.no_grad():
        for x in batches:
            qmodel(x)
    return qmodel.eval()


def quantizer_ranges(qmodel: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{quantizer name: (min, max)}`` of every activation quantizer's tracked range (copies)."""
    return {
        n: (p.observer.min_val.clone(), p.observer.max_val.clone()) for n, p in qmodel.quantizers().items()
    }


def saved_bytes(fn, *args, exclude: frozenset[int] | set[int] = frozenset()):
    """``fn(*args)`` and the bytes autograd keeps for its backward, by dtype; tensors whose ``data_ptr`` is in
    ``exclude`` (e.g. the parameters themselves) are not counted."""
    by_dtype: dict[torch.dtype, int] = {}

    def pack(t):
        if t.data_ptr() not in exclude:
            by_dtype[t.dtype] = by_dtype.get(t.dtype, 0) + t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, by_dtype


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |b|."""
    return float((a - b).detach().abs().max() / b.detach().abs().max())


def is_pow2(v: torch.Tensor | np.ndarray | float) -> bool:
    """Every element is ± a power of 2 (zero is not)."""
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().double().numpy()
    m, _ = np.frexp(np.asarray(v, dtype=np.float64))
    return bool(np.all(np.abs(m) == 0.5))


# ------------------------------------------------------------------------------------------ DDP workers
def init_gloo(rank: int, world: int, port: int) -> None:
    """In a spawned DDP test worker: one thread, the gloo process group on localhost (loopback on Linux)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
