"""Run an exported ONNX in onnxruntime (CPU) and compare it with a PyTorch reference — and, for a QDQ
file, with the bit-true integer reference (:mod:`xnnq.export.reference`): three independent
computations of the same file."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from .options import options_path, read_options


def ort_session(model: str | Path | onnx.ModelProto, optimize: bool = True, threads: int = 0):
    """An onnxruntime CPU session; ``optimize=False`` runs every node as written (no QDQ fusion)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    # x86 without VNNI (AVX2 / AVX-512F): MLAS's u8s8 int8 GEMM (vpmaddubsw) saturates pairwise sums to int16,
    # so the fused QLinearConv/QGemm differ from the QDQ graph; use the exact u8u8 kernel (no-op elsewhere).
    so.add_session_config_entry("session.x64quantprecision", "1")
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


class OnnxRunner:
    """Call an ONNX model like a module on torch tensors of any batch size (split to the graph's static
    batch, the last chunk padded)."""

    def __init__(self, model: str | Path | onnx.ModelProto, optimize: bool = True, threads: int = 0):
        self.session = ort_session(model, optimize, threads)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.batch = inp.shape[0] if isinstance(inp.shape[0], int) else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().cpu().float().numpy()
        b = self.batch or x.shape[0]
        outs = []
        for i in range(0, x.shape[0], b):
            chunk = x[i : i + b]
            n = chunk.shape[0]
            if n < b:
                chunk = np.concatenate([chunk, np.zeros((b - n, *chunk.shape[1:]), chunk.dtype)])
            outs.append(self.session.run(None, {self.input_name: chunk})[0][:n])
        return torch.from_numpy(np.concatenate(outs))


def first_output(out: Any) -> torch.Tensor:
    """The first tensor of a model output (a tensor, a tuple/list, or a dict such as torchvision's segmentation)."""
    if isinstance(out, dict):
        out = next(iter(out.values()))
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class CheckResult:
    """Agreement of an ONNX model with its reference over ``n`` samples."""

    n: int
    max_abs_diff: float
    lsb: float | None  # the output quantizer's step (None: output not quantized)
    max_lsb_diff: float | None
    frac_within_1_lsb: float | None  # fraction of output elements with |diff| <= 1 LSB
    frac_exact: float  # fraction of output elements equal bit for bit
    top1_agreement: float | None  # fraction of samples with the same argmax (2-D outputs)
    # the integer reference (QDQ files; None when not run)
    rounding: str | None = None  # the rounding mode the integer reference used
    ref_frac_exact_vs_ort: float | None = None  # output elements where reference == onnxruntime
    ref_frac_exact_vs_sim: float | None = None  # output elements where reference == the PyTorch reference
    ref_top1_vs_ort: float | None = None
    ref_top1_vs_sim: float | None = None
    first_divergence: dict[str, dict] | None = None  # per disagreeing pair: the first tensor where they part
    reference_error: str | None = None  # why the integer reference could not run (integer_reference=None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def output_lsb(path: str | Path) -> float | None:
    """The step of the quantizer that produces the graph output, from the JSON beside ``path``."""
    if not options_path(path).is_file():
        return None
    opts = read_options(path)
    out = onnx.load(str(path), load_external_data=False).graph.output[0].name
    return opts.get("activation_scales", {}).get(out)


def simulation_rounding(reference: Any) -> str:
    """The rounding mode of ``reference``'s activation quantizers when they share one, else ``"half_even"``
    (onnxruntime's)."""
    from ..layers.pact2 import PACT2

    modes = (
        {m.rounding.value for m in reference.modules() if isinstance(m, PACT2)}
        if isinstance(reference, torch.nn.Module)
        else set()
    )
    return modes.pop() if len(modes) == 1 else "half_even"


def _is_qdq(path: str | Path | onnx.ModelProto) -> bool:
    model = path if isinstance(path, onnx.ModelProto) else onnx.load(str(path), load_external_data=False)
    return any(n.op_type == "QuantizeLinear" for n in model.graph.node)


def _agree(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int]:
    """(equal elements, equal argmax rows for 2-D outputs)."""
    eq = int((a == b).sum())
    top = int((a.argmax(1) == b.argmax(1)).sum()) if a.dim() == 2 else 0
    return eq, top


@torch.no_grad()
def onnx_check(
    path: str | Path | onnx.ModelProto,
    reference: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[Any],
    *,
    optimize: bool = True,
    lsb: float | None = None,
    threads: int = 0,
    integer_reference: bool | None = None,
    rounding: str | None = None,
) -> CheckResult:
    """Run the ONNX at ``path`` in onnxruntime and ``reference`` on the same ``batches`` and compare.

    ``batches`` yields input tensors or ``(input, label)`` pairs. ``lsb`` defaults to the output
    quantizer's step from the export JSON. Returns max |diff|, the diff in output LSBs, the fraction of
    elements within 1 LSB, and the top-1 agreement of onnxruntime vs ``reference``.

    For a QDQ file the integer reference (:func:`xnnq.export.reference.run`) computes the same batches
    with ``rounding`` (default: the rounding of ``reference``'s quantizers, ``"half_even"`` by default for an xnnq
    model; ``"half_even"`` is onnxruntime's), and the result also holds its agreement with onnxruntime
    and with ``reference``; on the first batch where any two of the three disagree, ``first_divergence``
    names, for each disagreeing pair, the first quantized tensor (topological order) where their
    integer codes part. ``integer_reference``: ``None`` runs it when the file is QDQ and notes in
    ``reference_error`` why it could not; ``True`` requires it; ``False`` skips it.
    """
    runner = OnnxRunner(path, optimize, threads)
    was_training = isinstance(reference, torch.nn.Module) and reference.training
    try:
        if isinstance(reference, torch.nn.Module):
            reference.eval()
        if lsb is None and not isinstance(path, onnx.ModelProto):
            lsb = output_lsb(path)
        ref_model, ref_error = None, None
        if integer_reference or (integer_reference is None and _is_qdq(path)):
            from .reference import IntegerReference, IntegerReferenceError

            rounding = rounding or simulation_rounding(reference)
            try:
                ref_model = IntegerReference(path, rounding)
            except IntegerReferenceError as e:
                if integer_reference:
                    raise
                ref_error = str(e)
        n = 0
        max_diff = 0.0
        within = exact = elems = agree = 0
        ref_ort = ref_sim = ref_ort_top = ref_sim_top = 0
        divergence = None
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            y = runner(x)
            ref = reference(x)
            ref = first_output(ref).detach().cpu().float()
            if y.shape != ref.shape:
                raise ValueError(
                    f"onnx_check: the ONNX output has shape {tuple(y.shape)}, the reference {tuple(ref.shape)}"
                )
            d = (y - ref).abs()
            max_diff = max(max_diff, float(d.max()))
            elems += d.numel()
            exact += int((d == 0).sum())
            if lsb:
                within += int((d <= lsb * (1 + 1e-6)).sum())
            if y.dim() == 2:
                agree += int((y.argmax(1) == ref.argmax(1)).sum())
            if ref_model is not None:
                xi = x.detach().cpu().float().numpy()
                try:
                    yi = torch.from_numpy(np.asarray(ref_model(xi)[0], dtype=np.float32))
                except IntegerReferenceError as e:
                    if integer_reference:
                        raise
                    ref_model, ref_error = None, str(e)
                else:
                    e1, t1 = _agree(yi, y)
                    e2, t2 = _agree(yi, ref)
                    ref_ort, ref_ort_top = ref_ort + e1, ref_ort_top + t1
                    ref_sim, ref_sim_top = ref_sim + e2, ref_sim_top + t2
                    disagree = e1 < yi.numel() or e2 < yi.numel() or int((d == 0).sum()) < d.numel()
                    if divergence is None and disagree:
                        from .divergence import first_divergence, ort_codes, sim_codes

                        codes = {
                            "ref": ref_model.trace(xi, keep=True)[1],
                            "ort": ort_codes(ref_model, xi, optimize, threads),
                            "sim": sim_codes(
                                reference, x, ref_model, None if isinstance(path, onnx.ModelProto) else path
                            ),
                        }
                        divergence = first_divergence(ref_model, codes)
            n += x.shape[0]
    finally:
        if was_training:
            reference.train()
    if n == 0:
        raise ValueError("onnx_check: `batches` yielded nothing")
    two_d = y.dim() == 2
    ran = ref_model is not None
    return CheckResult(
        n=n,
        max_abs_diff=max_diff,
        lsb=lsb,
        max_lsb_diff=max_diff / lsb if lsb else None,
        frac_within_1_lsb=within / elems if lsb else None,
        frac_exact=exact / elems,
        top1_agreement=agree / n if two_d else None,
        rounding=rounding if ran else None,
        ref_frac_exact_vs_ort=ref_ort / elems if ran else None,
        ref_frac_exact_vs_sim=ref_sim / elems if ran else None,
        ref_top1_vs_ort=ref_ort_top / n if ran and two_d else None,
        ref_top1_vs_sim=ref_sim_top / n if ran and two_d else None,
        first_divergence=divergence,
        reference_error=ref_error,
    )


@torch.no_grad()
def onnx_accuracy(
    model: str | Path | onnx.ModelProto,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimize: bool = True,
    threads: int = 0,
) -> float:
    """Top-1 accuracy in percent of an ONNX classifier on ``(input, label)`` batches."""
    runner = OnnxRunner(model, optimize, threads)
    correct = total = 0
    for x, y in batches:
        correct += int((runner(x).argmax(1) == y.cpu()).sum())
        total += y.numel()
    return 100.0 * correct / max(total, 1)
