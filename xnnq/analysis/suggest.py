"""``suggest_16bit``: which layers to put in 16 bits, from the sensitivity ranking.

Model: quantization noise sources add up (independent noise powers add), so the output error with a set
of 8-bit layers is estimated as the measured whole-network error times the share of those layers in the
sum of the single-layer noises; a 16-bit layer's noise (2^-16 of its 8-bit noise) is taken as zero.
The error is expressed as the top-1 disagreement with the quantization-free output (percentage points),
measured on the analysis batches. It is an estimate: verify the suggestion by building the model with
``bitwidth_overrides={name: 16 for name in layers}`` and evaluating it.
"""

from __future__ import annotations

from .result import AnalysisResult


def estimated_drop(result: AnalysisResult, sixteen_bit: list[str]) -> float | None:
    """Estimated top-1 agreement drop (points) left when the layers in ``sixteen_bit`` are 16-bit."""
    drop_all = result.summary.get("agreement_all_quantized_vs_quant_off")
    noises = {s.name: s.sens_noise or 0.0 for s in result.layers}
    total = sum(noises.values())
    if drop_all is None or total <= 0:
        return None
    left = sum(v for n, v in noises.items() if n not in set(sixteen_bit))
    return (100.0 - drop_all) * left / total


def suggest_16bit(
    result: AnalysisResult,
    *,
    target_drop: float | None = None,
    count: int | None = None,
    weight_layers_only: bool = False,
) -> list[str]:
    """Layers to put in 16 bits, most sensitive first.

    Give ``count`` (the ``count`` most sensitive layers) or ``target_drop`` (the fewest layers, in ranking
    order, whose estimated top-1 agreement drop left is ``<= target_drop`` points; see the module doc).
    ``weight_layers_only`` keeps conv/linear layers only. The names work as ``bitwidth_overrides`` keys.
    """
    if (target_drop is None) == (count is None):
        raise ValueError(
            "suggest_16bit: give exactly one of target_drop (points of top-1 agreement) or count"
        )
    ranked = [s for s in result.ranked() if s.sens_noise is not None]
    if not ranked:
        raise ValueError("suggest_16bit: the analysis has no sensitivity; run analyze(..., sensitivity=True)")
    if weight_layers_only:
        ranked = [s for s in ranked if s.weight_bits is not None]
    if count is not None:
        if count < 0:
            raise ValueError(f"suggest_16bit: count must be >= 0, got {count}")
        return [s.name for s in ranked[:count]]
    chosen: list[str] = []
    for s in ranked:
        est = estimated_drop(result, chosen)
        if est is None or est <= target_drop:
            break
        chosen.append(s.name)
    return chosen
