"""Training recipes on top of the wrappers: one QAT fine-tuning loop for any model, task and loss.

qmodel = xnnq.QuantTrainModule(model, dummy_input)
qmodel = xnnq.recipes.qat_finetune(qmodel, train_batches, epochs=1, lr=1e-4)
xnnq.export_onnx(qmodel, dummy_input, "model.onnx")
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .layers.freeze import freeze_quant_range
from .layers.pact2 import PACT2
from .utils.bn import freeze_bn

LossFn = Callable[[Any, Any], torch.Tensor]

__all__ = ["RANGE_LR", "qat_finetune", "threshold_optimizers", "to_device"]


def to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor in it (also inside lists, tuples and dicts) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return type(obj)({k: to_device(v, device) for k, v in obj.items()})
    if isinstance(obj, (list, tuple)):
        moved = [to_device(v, device) for v in obj]
        return type(obj)(*moved) if hasattr(obj, "_fields") else type(obj)(moved)
    return obj


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _check_fraction(name: str, value: float | None) -> None:
    if value is not None and not 0.0 <= value <= 1.0:
        raise ValueError(
            f"{name} is a fraction of the training steps in [0, 1] (or None: never), got {value}"
        )


RANGE_LR = 1e-2  # Adam's learning rate for learned log2 thresholds (the TQT paper's; docs/README_tqt.md)


def threshold_optimizers(qmodel: nn.Module, lr: float = RANGE_LR) -> list[torch.optim.Optimizer]:
    """``[Adam(qmodel.range_parameters(), lr)]`` (no weight decay) when the wrapper learns thresholds, else
    ``[]``: the optimizer to step beside the weights' one (``optimizer=[opt_w, *threshold_optimizers(q)]``)."""
    thresholds = list(qmodel.range_parameters()) if hasattr(qmodel, "range_parameters") else []
    return [torch.optim.Adam(thresholds, lr=lr)] if thresholds else []


def qat_finetune(
    qmodel: nn.Module,
    train_batches: Iterable[tuple[Any, Any]],
    *,
    epochs: float = 1.0,
    steps: int | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
    lr_schedule: str = "cosine",
    loss_fn: LossFn | None = None,
    freeze_bn_at: float | None = 0.0,
    freeze_range_at: float | None = 0.5,
    device: torch.device | str | None = None,
    progress: bool = True,
    desc: str = "QAT",
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 50,
    range_lr: float | None = None,
) -> nn.Module:
    """Fine-tune a QAT wrapper (``xnnq.QuantTrainModule``) and return it in eval mode (what TIDL computes).

    ``train_batches`` yields ``(inputs, targets)``; it is iterated once per epoch, so give a re-iterable
    (a ``DataLoader``, a list, :class:`xnnq.data.Batches`). A one-shot generator works with ``steps`` no
    larger than its length. ``loss_fn(qmodel(inputs), targets)`` is the loss (default cross-entropy);
    targets may be tensors or nested lists/dicts of tensors (detection), moved to the model's device.

    Recipe: ``steps`` optimizer steps (default ``round(epochs * len(train_batches))``); SGD (momentum 0.9,
    Nesterov, ``lr`` default 1e-4, ``weight_decay`` default 5e-4) unless ``optimizer`` is given, and with
    learned thresholds (``range_learning="tqt"``) an Adam over ``qmodel.range_parameters()`` beside it
    (``range_lr``, default 1e-2, no weight decay: the TQT paper's; the SGD gets the other parameters);
    ``lr_schedule`` "cosine" (``CosineAnnealingLR`` to 0 over the steps) or "constant"; BatchNorm frozen
    (running statistics, :func:`xnnq.utils.freeze_bn`) from step ``freeze_bn_at * steps`` and activation
    ranges frozen (:func:`xnnq.layers.freeze_quant_range`) from step ``freeze_range_at * steps``, at least 1
    when the fraction is not 0, so the ranges see a batch (fractions; ``None`` never freezes). ``device``
    moves the model there first; batches follow the model.
    Nothing is ever un-frozen. Seed the global RNG and your batches' generator for a reproducible run.

    ``optimizer`` may be a sequence of optimizers over disjoint parameters, stepped together, each on the
    schedule — e.g. the weights' one over ``qmodel.non_range_parameters()`` and an Adam over the learned
    thresholds, ``qmodel.range_parameters()`` (``range_learning="tqt"``).

    ``checkpoint``: a file that makes the run resumable. Every ``checkpoint_every`` steps the model, the
    optimizers, the schedules, the global RNG and the step are saved there (written to a temporary file,
    then renamed); when the file exists at the call, the run resumes from it: ``train_batches`` is iterated
    again from the start and the batches before the saved step are skipped (drawn, not trained on), so
    batches that come out the same for the same seed give the uninterrupted run's numbers bit for bit.
    Build the model and the optimizers as for a fresh run. The file is deleted when the run completes.
    It also holds ``seconds`` and ``cpu_seconds``: the wall and process time of the training steps up to
    the saved step, summed over the sessions. The CPU RNG is saved, not CUDA's; under DDP give every rank
    its own file.
    """
    inner = (
        qmodel.module
        if isinstance(qmodel, (nn.DataParallel, nn.parallel.DistributedDataParallel))
        else qmodel
    )
    if not any(isinstance(m, PACT2) for m in inner.modules()):
        raise TypeError(
            f"qat_finetune: {type(inner).__name__} holds no activation quantizer; wrap the float model "
            "first: qmodel = xnnq.QuantTrainModule(model, dummy_input)"
        )
    if optimizer is not None and (lr is not None or weight_decay is not None or range_lr is not None):
        raise ValueError(
            "qat_finetune: give either optimizer= or lr=/weight_decay=/range_lr= (they configure the default "
            "optimizers)"
        )
    if lr_schedule not in ("cosine", "constant"):
        raise ValueError(f"qat_finetune: lr_schedule must be 'cosine' or 'constant', got {lr_schedule!r}")
    _check_fraction("freeze_bn_at", freeze_bn_at)
    _check_fraction("freeze_range_at", freeze_range_at)
    if steps is None:
        if not hasattr(train_batches, "__len__"):
            raise TypeError(
                "qat_finetune: train_batches has no len(); pass steps= or a sized re-iterable "
                "(a DataLoader, a list, xnnq.data.Batches)"
            )
        if epochs <= 0:
            raise ValueError(f"qat_finetune: epochs must be > 0, got {epochs}")
        steps = max(1, round(epochs * len(train_batches)))
    elif steps <= 0:
        raise ValueError(f"qat_finetune: steps must be > 0, got {steps}")
    if checkpoint is not None and checkpoint_every < 1:
        raise ValueError(f"qat_finetune: checkpoint_every must be >= 1, got {checkpoint_every}")
    loss_fn = loss_fn or F.cross_entropy

    if device is not None:
        qmodel.to(device)
    target = _model_device(qmodel)
    qmodel.train()
    if optimizer is None:
        weights = (
            inner.non_range_parameters()
            if hasattr(inner, "non_range_parameters")
            else list(qmodel.parameters())
        )
        thresholds = threshold_optimizers(inner, RANGE_LR if range_lr is None else range_lr)
        optimizer = [
            torch.optim.SGD(
                weights,
                lr=1e-4 if lr is None else lr,
                momentum=0.9,
                nesterov=True,
                weight_decay=5e-4 if weight_decay is None else weight_decay,
            ),
            *thresholds,
        ]
        if range_lr is not None and not thresholds:
            raise ValueError(
                "qat_finetune: range_lr= trains learned thresholds, and this model has none; build it with "
                "QuantTrainModule(..., range_learning='tqt') or drop range_lr="
            )
    optimizers = [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else list(optimizer)
    if not optimizers:
        raise ValueError("qat_finetune: optimizer= is an empty sequence")
    scheds = (
        [torch.optim.lr_scheduler.CosineAnnealingLR(o, steps) for o in optimizers]
        if lr_schedule == "cosine"
        else []
    )
    bn_step = None if freeze_bn_at is None else int(freeze_bn_at * steps)
    range_step = None if freeze_range_at is None else int(freeze_range_at * steps)
    if range_step == 0 and freeze_range_at > 0:  # a short run: the ranges see one batch before they freeze
        range_step = 1

    start, seconds, cpu_seconds, rng = 0, 0.0, 0.0, None
    ckpt = None if checkpoint is None else Path(checkpoint)
    if ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        if state["steps"] != steps or len(state["optimizers"]) != len(optimizers):
            raise ValueError(
                f"qat_finetune: {ckpt} is a checkpoint of a run of {state['steps']} steps with "
                f"{len(state['optimizers'])} optimizer(s), not of this one ({steps} steps, {len(optimizers)}); "
                "delete it or pass another checkpoint="
            )
        inner.load_state_dict(state["model"])
        for o, s in zip(optimizers, state["optimizers"]):
            o.load_state_dict(s)
        for sc, s in zip(scheds, state["schedulers"]):
            sc.load_state_dict(s)
        start, seconds, cpu_seconds, rng = state["step"], state["seconds"], state["cpu_seconds"], state["rng"]
        # freezing is saved with a wrapper's state; a plain model with quantizers gets its BN frozen again
        if bn_step is not None and bn_step < start:
            freeze_bn(inner)
        if range_step is not None and range_step < start:
            freeze_quant_range(inner)

    def save(step: int, wall: float, cpu: float) -> None:
        tmp = ckpt.with_name(ckpt.name + ".tmp")
        torch.save(
            {
                "step": step,
                "steps": steps,
                "model": inner.state_dict(),
                "optimizers": [o.state_dict() for o in optimizers],
                "schedulers": [sc.state_dict() for sc in scheds],
                "rng": torch.get_rng_state(),
                "seconds": wall,
                "cpu_seconds": cpu,
            },
            tmp,
        )
        os.replace(tmp, ckpt)

    step = 0
    t0, c0 = time.perf_counter(), time.process_time()
    with tqdm(total=steps, initial=start, desc=desc, disable=not progress) as bar:
        while step < steps:
            seen = False
            for inputs, targets in train_batches:
                seen = True
                if step < start:  # resuming: replay the batches (their order and augmentation) unused
                    step += 1
                    if step == start:
                        torch.set_rng_state(rng)
                        t0, c0 = time.perf_counter(), time.process_time()
                    continue
                if step == bn_step:
                    freeze_bn(inner)
                if step == range_step:
                    freeze_quant_range(inner)
                inputs, targets = to_device(inputs, target), to_device(targets, target)
                for o in optimizers:
                    o.zero_grad(set_to_none=True)
                loss = loss_fn(qmodel(inputs), targets)
                loss.backward()
                for o in optimizers:
                    o.step()
                for sc in scheds:
                    sc.step()
                step += 1
                bar.update()
                if progress and step % 20 == 0:  # a host sync every 20 steps, only when the bar is shown
                    bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
                if ckpt is not None and step % checkpoint_every == 0 and step < steps:
                    save(
                        step,
                        seconds + time.perf_counter() - t0,
                        cpu_seconds + time.process_time() - c0,
                    )
                if step >= steps:
                    break
            if not seen:
                raise ValueError(
                    f"qat_finetune: train_batches yielded no batch after {step} of {steps} steps "
                    "(an exhausted generator? give a re-iterable or fewer steps)"
                )
    if ckpt is not None:
        ckpt.unlink(missing_ok=True)
    return qmodel.eval()
