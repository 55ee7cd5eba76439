"""The analysis result: one row per layer, ranked by sensitivity, as Markdown or JSON."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass
class LayerStats:
    """Everything measured for one layer (a conv/linear with its output quantizer(s), or an activation-only op).

    SQNRs are in dB. ``act_*``: the layer's output quantizer (the worst one when it has several) against the
    float model's tensor at the same place; ``clip_pct``: % of the quantizer's inputs outside its clip
    interval; ``sat_pct``: % of its outputs on the extreme code. ``sens_*``: the network output when *only*
    this layer is quantized, against the output with quantization switched off (``sens_noise`` = output
    noise power / output power; ``sens_agree`` = % of top-1 decisions unchanged; ``sens_kl`` = mean KL of
    the softmax, nats).
    """

    name: str
    kind: str
    index: int
    quantizers: list[str] = field(default_factory=list)
    weight_bits: int | None = None
    act_bits: int | None = None
    weight_sqnr: float | None = None
    weight_js: float | None = None
    weight_clip_pct: float | None = None
    scheme_sqnr: dict[str, float] = field(default_factory=dict)
    act_sqnr: float | None = None
    act_cosine: float | None = None
    float_min: float | None = None
    float_max: float | None = None
    clip_lo: float | None = None
    clip_hi: float | None = None
    clip_pct: float | None = None
    sat_pct: float | None = None
    sens_noise: float | None = None
    sens_sqnr: float | None = None
    sens_kl: float | None = None
    sens_agree: float | None = None
    rank: int | None = None


LEGEND = (
    "Sensitivity (sens): the network output when only that layer (weights + output activation) is "
    "quantized, vs the output with quantization off: output SQNR (dB, lower = more sensitive) and % of "
    "top-1 decisions unchanged. W: folded weights vs their quantized values (dB); W clip %: weights "
    "changed by the outlier clipping (constrain_weights); INT/POT/FLOAT: the same weights in each format "
    "at the layer's bitwidth; W JS: Jensen-Shannon divergence of the weight histograms (512 bins). A: the "
    "layer's quantized output vs the float model's tensor at the same place (cumulative error of "
    "everything before it); clip %: inputs beyond the clip interval; sat %: outputs on the extreme code."
)


def _clean(v: Any) -> Any:
    """JSON-safe: non-finite floats become None (e.g. the SQNR of an exactly representable tensor)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_clean(x) for x in v]
    return v


def _fmt(v: float | None, spec: str = ".1f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "∞" if v > 0 else "-∞"
    return format(v, spec)


@dataclass
class AnalysisResult:
    """Per-layer statistics (``layers``, network order) and whole-network numbers (``summary``)."""

    layers: list[LayerStats]
    summary: dict[str, Any]

    def ranked(self) -> list[LayerStats]:
        """Layers from the most to the least sensitive (layers without a sensitivity last)."""
        return sorted(self.layers, key=lambda s: (s.rank is None, s.rank or 0))

    def layer(self, name: str) -> LayerStats:
        for s in self.layers:
            if s.name == name:
                return s
        raise KeyError(f"no layer {name!r} in the analysis; layers: {', '.join(s.name for s in self.layers)}")

    def to_dict(self) -> dict[str, Any]:
        return _clean({"summary": self.summary, "layers": [asdict(s) for s in self.ranked()]})

    def to_json(self, path: str | Path | None = None) -> str:
        """The result as JSON (non-finite numbers as ``null``); also written to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=1, allow_nan=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> AnalysisResult:
        """Read a result written by :meth:`to_json` (a path or the JSON text)."""
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        d = json.loads(text)
        names = {f.name for f in fields(LayerStats)}
        layers = [LayerStats(**{k: v for k, v in row.items() if k in names}) for row in d["layers"]]
        return cls(sorted(layers, key=lambda s: s.index), d["summary"])

    def to_markdown(self, top: int | None = None) -> str:
        """A summary and the ranked per-layer table (the ``top`` most sensitive rows, default all)."""
        s = self.summary
        lines = ["## Quantization analysis", ""]
        facts = [
            ("samples", s.get("samples")),
            ("output SQNR (all quantized), dB", _fmt(s.get("output_sqnr"))),
            ("top-1 agreement with float, %", _fmt(s.get("agreement"), ".2f")),
        ]
        if s.get("acc_float") is not None:
            facts += [
                (
                    "accuracy float / quantized, %",
                    f"{_fmt(s['acc_float'], '.2f')} / {_fmt(s['acc_quant'], '.2f')}",
                )
            ]
        facts += [("sensitivity samples (per layer pass)", s.get("sensitivity_samples"))]
        lines += [f"- {k}: {v}" for k, v in facts if v is not None] + [""]
        lines += [LEGEND, ""]
        head = [
            "#",
            "layer",
            "kind",
            "bits W/A",
            "sens SQNR",
            "agree %",
            "W SQNR",
            "W clip %",
            "INT",
            "POT",
            "FLOAT",
            "W JS",
            "A SQNR",
            "A cos",
            "float range",
            "clip",
            "clip %",
            "sat %",
        ]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        rows = self.ranked()[:top] if top else self.ranked()
        for r in rows:
            bits = f"{r.weight_bits or '–'}/{r.act_bits or '–'}"
            rng = (
                f"[{_fmt(r.float_min, '.3g')}, {_fmt(r.float_max, '.3g')}]"
                if r.float_min is not None
                else "–"
            )
            clip = f"[{_fmt(r.clip_lo, '.3g')}, {_fmt(r.clip_hi, '.3g')}]" if r.clip_lo is not None else "–"
            sc = r.scheme_sqnr or {}
            cells = [
                _fmt(r.rank, "d") if r.rank is not None else "–",
                f"`{r.name}`",
                r.kind,
                bits,
                _fmt(r.sens_sqnr),
                _fmt(r.sens_agree, ".1f"),
                _fmt(r.weight_sqnr),
                _fmt(r.weight_clip_pct, ".3f"),
                _fmt(sc.get("INT")),
                _fmt(sc.get("POT")),
                _fmt(sc.get("FLOAT")),
                _fmt(r.weight_js, ".4f"),
                _fmt(r.act_sqnr),
                _fmt(r.act_cosine, ".4f"),
                rng,
                clip,
                _fmt(r.clip_pct, ".3f"),
                _fmt(r.sat_pct, ".3f"),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        sug = s.get("suggest_16bit")
        if sug:
            names = ", ".join(f"`{n}`" for n in sug["layers"]) or "none"
            lines += [
                "",
                (
                    f"Suggested 16-bit layers ({sug.get('rule')}): {names} — estimated top-1 agreement "
                    f"drop left: {_fmt(sug.get('estimated_drop'), '.2f')} points."
                ),
            ]
        return "\n".join(lines) + "\n"
