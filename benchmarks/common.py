"""Shared helpers for the benchmark scripts: JSON output, and the RESULTS.md log when asked (``--record``).

Run the scripts from the repository root with the package installed (``pip install -e .``); the data
comes from :func:`xnnq.data.data_root` (``$XNNQ_DATA``, default ``../shared/data``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from xnnq.calibrate import QuantCalibrateModule
from xnnq.recipes import qat_finetune

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine() -> dict[str, Any]:
    """torch version, threads, CPU count and Python version of this run."""
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }


def add_record_arg(ap: argparse.ArgumentParser) -> None:
    """``--record``: append the result to benchmarks/RESULTS.md (without it the script prints JSON only)."""
    ap.add_argument(
        "--record",
        action="store_true",
        help="append the table and the JSON to benchmarks/RESULTS.md (default: print the JSON only)",
    )


def emit(name: str, result: dict[str, Any], table_md: str, *, record: bool) -> dict[str, Any]:
    """Print ``result`` (with date and machine) as JSON; with ``record`` also append ``table_md`` and the
    JSON under a dated heading to RESULTS.md. Returns the printed dict."""
    result = {
        "benchmark": name,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        **result,
        "machine": machine(),
    }
    print(json.dumps(result, indent=2, default=str))
    if record:
        with RESULTS.open("a") as f:
            f.write(
                f"\n### {name} — {result['date']}\n\n{table_md.rstrip()}\n\n"
                f"<details><summary>JSON</summary>\n\n```json\n"
                f"{json.dumps(result, indent=1, default=str)}\n```\n"
                "</details>\n"
            )
    return result


def range_learning_kwargs(
    range_learning: str, init_batches: int, anchor: str = "statistics", hysteresis: float | None = None
) -> dict[str, Any]:
    """``QuantTrainModule`` keyword arguments of a range-learning mode: none for ``"statistics"`` (the
    default), else ``range_learning``, ``range_init_batches``, ``range_anchor`` and (unless ``None``: the
    library's default) ``range_hysteresis``."""
    if range_learning == "statistics":
        return {}
    kw = {"range_learning": range_learning, "range_init_batches": init_batches, "range_anchor": anchor}
    return kw if hysteresis is None else {**kw, "range_hysteresis": hysteresis}


class TracedAdam(torch.optim.Adam):
    """Adam over a wrapper's learned thresholds that appends to ``trace``, at each step, every threshold's
    octave in force during the step's forward (``"k"``, octaves from its initial one: the frozen one, the octave
    held, or under the paper's ceil the octave of ``log2 t``) and its offset ``log2 t − anchor`` after the step
    (``"u"``);
    per-channel thresholds give lists. What ``bench_tqt.py --trace`` writes."""

    def __init__(self, qmodel, lr: float, trace: list):
        self.ranges, self.trace = dict(qmodel.learned_ranges()), trace
        super().__init__(qmodel.range_parameters(), lr=lr)

    def step(self, closure=None):
        with torch.no_grad():  # the learned log2 threshold the forward used: frozen, held or log2 t itself
            used = {n: torch.ceil(m.learned_log2 - m.anchor - 0.5).tolist() for n, m in self.ranges.items()}
        loss = super().step(closure)
        with torch.no_grad():
            self.trace.append(
                {n: {"k": used[n], "u": (m.log2_t - m.anchor).tolist()} for n, m in self.ranges.items()}
            )
        return loss


def qat_optimizers(
    qmodel,
    weights: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
    lr_th: float,
    trace: list | None = None,
) -> list[torch.optim.Optimizer]:
    """``weights(qmodel.non_range_parameters())`` (every parameter with statistics ranges), and with learned
    thresholds an Adam over ``qmodel.range_parameters()`` at ``lr_th`` without weight decay (the TQT
    paper's optimizer; a :class:`TracedAdam` filling ``trace`` when given); both follow the recipe's schedule
    in :func:`xnnq.recipes.qat_finetune`."""
    opts = [weights(qmodel.non_range_parameters())]
    if qmodel.range_parameters():
        opts.append(
            torch.optim.Adam(qmodel.range_parameters(), lr=lr_th)
            if trace is None
            else TracedAdam(qmodel, lr_th, trace)
        )
    return opts


def qat_finetune_timed(qmodel, train_batches: Iterable, *, checkpoint: Path | None = None, **kwargs):
    """:func:`xnnq.recipes.qat_finetune` and its CPU seconds (process time), those of the sessions before a
    resume from ``checkpoint`` included. Returns ``(qmodel, cpu_seconds)``."""
    before = 0.0
    if checkpoint is not None and Path(checkpoint).is_file():
        before = float(torch.load(checkpoint, map_location="cpu", weights_only=True)["cpu_seconds"])
    t0 = time.process_time()
    qmodel = qat_finetune(qmodel, train_batches, checkpoint=checkpoint, **kwargs)
    return qmodel, before + time.process_time() - t0


def calibrate_timed(model: torch.nn.Module, dummy: torch.Tensor, calib: Iterable[torch.Tensor], **settings):
    """``QuantCalibrateModule(model, dummy, **settings)`` calibrated over the batches ``calib`` (train mode, no
    grad), then in eval mode; returns ``(wrapper, cpu_seconds)`` (construction excluded)."""
    q = QuantCalibrateModule(model, dummy, **settings)
    t0 = time.process_time()
    q.train()
    with torch.no_grad():
        for xb in calib:
            q(xb)
    q.eval()
    return q, time.process_time() - t0


def ort_calibration_reader(batches: Iterable[torch.Tensor]):
    """An onnxruntime ``CalibrationDataReader`` that feeds ``batches`` to the graph input ``"input"`` once
    (for the ``quantize_static`` peers)."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": x.numpy()} for x in batches])

        def get_next(self):
            return next(self.it, None)

    return _Reader()
