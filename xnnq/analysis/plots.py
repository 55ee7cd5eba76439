"""PNG plots of an analysis (matplotlib, Agg backend): SQNR per layer, activation range vs clip, a weight histogram."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..layers.fake_quant import quant_bounds
from ..quantize.wrapper import QuantBaseModule
from .result import AnalysisResult
from .weights import folded_weights


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finite(v: float | None, cap: float = 80.0) -> float:
    if v is None or math.isnan(v):
        return 0.0
    return min(v, cap)


def plot_sqnr(result: AnalysisResult, path: str | Path) -> Path:
    """Bars of weight and activation SQNR per layer (network order), sensitivity as points."""
    plt = _pyplot()
    rows = result.layers
    x = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(rows) + 2), 4.2), dpi=90)
    ax.bar(
        [i - 0.2 for i in x],
        [_finite(r.weight_sqnr) for r in rows],
        0.4,
        label="weights SQNR",
        color="#4477aa",
    )
    ax.bar(
        [i + 0.2 for i in x],
        [_finite(r.act_sqnr) for r in rows],
        0.4,
        label="activation SQNR",
        color="#ee8866",
    )
    sens = [(i, r.sens_sqnr) for i, r in zip(x, rows) if r.sens_sqnr is not None]
    if sens:
        ax.plot(
            [i for i, _ in sens],
            [_finite(v) for _, v in sens],
            "k.",
            label="output SQNR, only this layer quantized",
        )
    ax.set_xticks(x, [r.name for r in rows], rotation=90, fontsize=7)
    ax.set_ylabel("SQNR (dB)")
    ax.set_title("Per-layer SQNR (higher is better)")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_activation_ranges(result: AnalysisResult, path: str | Path) -> Path:
    """Float activation range (bar) and the quantizer's clip interval (brackets) per layer."""
    plt = _pyplot()
    rows = [r for r in result.layers if r.clip_hi is not None]
    x = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.32 * len(rows) + 2), 4.2), dpi=90)
    lo = [r.float_min if r.float_min is not None else 0.0 for r in rows]
    hi = [r.float_max if r.float_max is not None else 0.0 for r in rows]
    ax.bar(
        x,
        [h - lo_ for lo_, h in zip(lo, hi)],
        0.6,
        bottom=lo,
        color="#99ccee",
        label="float range (observed)",
    )
    ax.hlines(
        [r.clip_hi for r in rows], [i - 0.4 for i in x], [i + 0.4 for i in x], colors="#cc3311", label="clip"
    )
    ax.hlines([r.clip_lo for r in rows], [i - 0.4 for i in x], [i + 0.4 for i in x], colors="#cc3311")
    for i, r in zip(x, rows):
        if (r.clip_pct or 0.0) >= 0.01:
            ax.annotate(
                f"{r.clip_pct:.2g}%", (i, max(hi[i], r.clip_hi)), fontsize=6, ha="center", va="bottom"
            )
    ax.set_xticks(x, [r.name for r in rows], rotation=90, fontsize=7)
    ax.set_ylabel("value")
    ax.set_title("Activation range vs clip interval (labels: % clipped, when >= 0.01%)")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


@torch.no_grad()
def plot_weight_histogram(qmodel: QuantBaseModule, layer: str, path: str | Path, bins: int = 200) -> Path:
    """Histogram of one layer's folded float weights with its quantization levels (and their counts)."""
    plt = _pyplot()
    w, wq = folded_weights(qmodel, layer)
    mod = qmodel.module.get_submodule(layer)
    fig, ax = plt.subplots(figsize=(7.0, 3.8), dpi=90)
    ax.hist(w.flatten().cpu().numpy(), bins=bins, color="#4477aa", alpha=0.8, label="float (folded) weights")
    ax.set_yscale("log")  # outliers (one or two weights) stay visible
    if mod.constrain_weights and bool((mod.constrain(w) != w).any()):
        t = float(mod.outlier_ratio * w.std())
        ax.axvline(-t, color="k", linestyle="--", linewidth=0.8)
        ax.axvline(t, color="k", linestyle="--", linewidth=0.8, label=f"outlier clip ±{mod.outlier_ratio:g}σ")
    if not mod.per_channel and mod.weight_bits <= 8:  # 16-bit levels are too dense to draw
        scale = mod.grid_scale(w)
        qmin, qmax = quant_bounds(mod.weight_bits, True)
        lo_c = int(torch.floor(w.min() / scale).clamp(min=qmin))
        hi_c = int(torch.ceil(w.max() / scale).clamp(max=qmax))
        levels = torch.arange(lo_c, hi_c + 1, dtype=w.dtype, device=w.device) * scale
        ax.vlines(
            levels.cpu().numpy(),
            0,
            1,
            transform=ax.get_xaxis_transform(),
            colors="#cc3311",
            linewidth=0.4,
            alpha=0.5,
            label=f"{mod.weight_bits}-bit levels (step {float(scale):.3g})",
        )
    vals, counts = torch.unique(wq.flatten(), return_counts=True)
    ax2 = ax.twinx()
    ax2.plot(
        vals.cpu().numpy(), counts.cpu().numpy(), ".", color="#cc3311", markersize=3, label="quantized counts"
    )
    ax2.set_ylabel("count per level", fontsize=8)
    ax.set_xlabel("weight value")
    ax.set_ylabel("count per bin")
    ax.set_title(f"{layer}: weight histogram and quantization levels")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def save_plots(
    result: AnalysisResult, qmodel: QuantBaseModule, out_dir: str | Path, layer: str | None = None
) -> list[Path]:
    """Write ``sqnr.png``, ``act_ranges.png`` and ``weights_<layer>.png`` (default: the most sensitive weight layer)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [plot_sqnr(result, out / "sqnr.png"), plot_activation_ranges(result, out / "act_ranges.png")]
    if layer is None:
        layer = next((r.name for r in result.ranked() if r.weight_bits is not None), None)
    if layer is not None:
        paths.append(plot_weight_histogram(qmodel, layer, out / f"weights_{layer.replace('.', '_')}.png"))
    return paths


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
