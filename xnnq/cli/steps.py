"""The steps the ``xnnq`` commands chain: wrapper options, PTQ, save/reload, export both formats, check,
analyze.

QAT is :func:`xnnq.recipes.qat_finetune`.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from .. import data
from ..quantize import QuantTestModule
from ..targets import TargetError, export_formats, get_target
from .errors import CliError

STATE_FILE, CONFIG_FILE = "quant_state.pt", "quant_config.json"


def wrapper_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """QuantBaseModule keyword arguments from the parsed quantization options (``--bits``, ``--per-channel``:
    ``None`` is the target's numerics, else per tensor; ``--sixteen-bit``, ``--no-constrain-weights``,
    ``--target``, ``--silu``, and ``--range-learning`` where the command has it: learned ranges on a chip with
    free scales get power-of-2 ranges, which every chip runs)."""
    bits, per_channel, sixteen_bit = args.bits, args.per_channel, args.sixteen_bit
    target, silu = args.target, args.silu
    constrain_weights = not args.no_constrain_weights
    range_learning = getattr(args, "range_learning", "statistics")
    kw: dict[str, Any] = {
        "bitwidth_weights": bits,
        "bitwidth_activations": bits,
        "constrain_weights": constrain_weights,
    }
    if target is not None:
        try:
            kw["target"] = get_target(target).name
        except TargetError as e:
            raise CliError(f"--target: {e}") from e
    if per_channel is not None or target is None:
        kw["per_channel_q"] = False if per_channel in (None, "none") else per_channel
    if silu is not None:
        kw["silu"] = silu
    if sixteen_bit:
        kw["bitwidth_overrides"] = {name: 16 for name in sixteen_bit}
    if range_learning != "statistics":
        kw["range_learning"] = range_learning
        if target is not None and not get_target(kw["target"]).power2_only:
            kw.update(power2_weight_range=True, power2_activation_range=True)
    return kw


def calibrate_ptq(
    model: nn.Module,
    dummy: torch.Tensor,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int,
    method: str,
    kwargs: dict[str, Any],
    progress: bool = True,
) -> nn.Module:
    """Post-training calibration (:class:`xnnq.calibrate.QuantCalibrateModule`) on ``images``; eval mode."""
    n = (len(labels) + batch_size - 1) // batch_size
    inputs = (x for x, _ in data.batches(images, labels, batch_size))
    return calibrate_on(model, dummy, inputs, n, method=method, kwargs=kwargs, progress=progress)


def calibrate_on(
    model: nn.Module,
    dummy: torch.Tensor,
    inputs: Iterable[torch.Tensor],
    batches: int,
    *,
    method: str,
    kwargs: dict[str, Any],
    progress: bool = True,
) -> nn.Module:
    """Post-training calibration on the input batches ``inputs`` (``batches`` of them, for the progress bar);
    eval mode."""
    from ..calibrate import QuantCalibrateModule

    q = QuantCalibrateModule(model.eval(), dummy, method=method, **kwargs).train()
    with torch.no_grad():
        for x in tqdm(inputs, total=batches, desc="calibrate", disable=not progress):
            q(x)
    return q.eval()


def save_quant(q: nn.Module, out: Path, config: dict[str, Any]) -> None:
    """Write the wrapper's state dict and the options needed to rebuild it (see :func:`load_quant`)."""
    torch.save(q.state_dict(), out / STATE_FILE)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=1))


def read_config(quant_dir: str | Path) -> dict[str, Any]:
    path = Path(quant_dir) / CONFIG_FILE
    if not path.is_file():
        raise CliError(f"--quant-dir {quant_dir}: no {CONFIG_FILE}; give the --out folder of `xnnq quantize`")
    cfg = json.loads(path.read_text())
    task = cfg.get("task", "classification")
    if task != "classification":
        raise CliError(
            f"--quant-dir {quant_dir} holds a {task} model: `xnnq eval` and `xnnq analyze` take classifiers. "
            f"Its float, quantized and ONNX metrics are in {Path(quant_dir) / 'summary.json'}; in Python, "
            f"xnnq.QuantTestModule(model, dummy, **kwargs) loads its {STATE_FILE} (kwargs in {CONFIG_FILE})"
        )
    return cfg


def load_quant(model: nn.Module, dummy: torch.Tensor, quant_dir: str | Path) -> nn.Module:
    """Rebuild the model written by ``xnnq quantize --out quant_dir`` around ``model``; eval mode."""
    cfg = read_config(quant_dir)
    state = torch.load(Path(quant_dir) / STATE_FILE, map_location="cpu", weights_only=True)
    if cfg["mode"] == "ptq":
        from ..calibrate import QuantCalibrateModule

        q = QuantCalibrateModule(model.eval(), dummy, method=cfg.get("method", "mse"), **cfg["kwargs"])
    else:
        q = QuantTestModule(model, dummy, **cfg["kwargs"])
    try:
        q.load_state_dict(state)
    except RuntimeError as e:
        raise CliError(
            f"{quant_dir}/{STATE_FILE} does not fit --model {cfg['model']}: {str(e).splitlines()[0][:300]}"
        ) from e
    return q.eval()


def export_both(
    q: nn.Module, dummy: torch.Tensor, out: Path, stem: str = "model", progress: bool = True
) -> dict[str, Path]:
    """``<stem>_tidl.onnx`` and ``<stem>_qdq.onnx`` (each with its ``.tidl.json`` options) in ``out``; with
    the wrapper's target, the formats that chip takes (AM6x: ``qdq`` only)."""
    from ..export import export_onnx

    paths = {}
    for fmt in tqdm(
        export_formats(getattr(q, "target", None)), desc="export", leave=False, disable=not progress
    ):
        paths[fmt] = export_onnx(q, dummy, out / f"{stem}_{fmt}.onnx", format=fmt).path
    return paths


def check_onnx(
    paths: dict[str, Path],
    q: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 100,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Per format: onnxruntime against the PyTorch quantized model (top-1 agreement, max |diff|, LSBs) and
    the ONNX model's accuracy."""
    from ..export.check import onnx_accuracy, onnx_check

    n = (len(labels) + batch_size - 1) // batch_size

    def bar(desc: str):
        return tqdm(
            data.batches(images, labels, batch_size), total=n, desc=desc, leave=False, disable=not progress
        )

    res = {}
    for fmt, path in paths.items():
        chk = onnx_check(path, q, bar(f"onnxruntime check ({fmt})"))
        acc = onnx_accuracy(path, bar(f"onnxruntime accuracy ({fmt})"))
        res[fmt] = {
            "path": str(path),
            "top1_agreement_pct": 100.0 * (chk.top1_agreement or 0.0),
            "max_abs_diff": chk.max_abs_diff,
            "max_lsb_diff": chk.max_lsb_diff,
            "accuracy": acc,
        }
        if chk.rounding is not None:  # QDQ: the integer reference beside onnxruntime (xnnq.export.reference)
            res[fmt].update(
                reference_rounding=chk.rounding,
                reference_exact_vs_model=chk.ref_frac_exact_vs_sim,
                reference_exact_vs_onnxruntime=chk.ref_frac_exact_vs_ort,
                first_divergence=chk.first_divergence,
            )
    return res


def write_analysis(
    q: nn.Module,
    float_model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    out: Path,
    *,
    batch_size: int = 64,
    sensitivity_batches: int = 4,
    target_drop: float | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run :func:`xnnq.analysis.analyze`, write ``report.md``, ``report.json`` and the PNGs to ``out``."""
    from ..analysis import analyze, estimated_drop, suggest_16bit
    from ..analysis.plots import save_plots

    res = analyze(
        q,
        float_model,
        list(data.batches(images, labels, batch_size)),
        sensitivity_batches=sensitivity_batches,
        progress=progress,
    )
    if target_drop is not None:
        layers = suggest_16bit(res, target_drop=target_drop)
        rule = f"target drop {target_drop} points"
    else:
        layers = suggest_16bit(res, count=min(3, len(res.layers)))
        rule = "3 most sensitive"
    res.summary["suggest_16bit"] = {
        "rule": rule,
        "layers": layers,
        "estimated_drop": estimated_drop(res, layers),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(res.to_markdown())
    res.to_json(out / "report.json")
    pngs = save_plots(res, q, out)
    return {
        "report": str(out / "report.md"),
        "json": str(out / "report.json"),
        "plots": [str(p) for p in pngs],
        "suggest_16bit": res.summary["suggest_16bit"],
        "output_sqnr": res.summary.get("output_sqnr"),
        "most_sensitive": [r.name for r in res.ranked()[:5]],
    }


def write_summary(out: Path, summary: dict[str, Any], t0: float) -> Path:
    """``summary`` with the run's ``seconds`` (since ``t0``, a ``time.perf_counter()``) as ``out/summary.json``."""
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    path = out / "summary.json"
    path.write_text(json.dumps(summary, indent=1))
    return path


def for_chip(kw: dict[str, Any]) -> str:
    """`` for <chip>`` when the wrapper options name a target, else empty (for the summary line)."""
    return f" for {kw['target']}" if "target" in kw else ""
