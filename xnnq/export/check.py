"""Run an exported ONNX in onnxruntime (CPU) and compare it with a PyTorch reference."""
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
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
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
            chunk = x[i:i + b]
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
    lsb: float | None             # the output quantizer's step (None: output not quantized)
    max_lsb_diff: float | None
    frac_within_1_lsb: float | None  # fraction of output elements with |diff| <= 1 LSB
    frac_exact: float             # fraction of output elements equal bit for bit
    top1_agreement: float | None  # fraction of samples with the same argmax (2-D outputs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def output_lsb(path: str | Path) -> float | None:
    """The step of the quantizer that produces the graph output, from the JSON beside ``path``."""
    if not options_path(path).is_file():
        return None
    opts = read_options(path)
    out = onnx.load(str(path), load_external_data=False).graph.output[0].name
    return opts.get("activation_scales", {}).get(out)


@torch.no_grad()
def onnx_check(path: str | Path | onnx.ModelProto, reference: torch.nn.Module | Callable[[torch.Tensor], torch.Tensor],
               batches: Iterable[Any], *, optimize: bool = True, lsb: float | None = None,
               threads: int = 0) -> CheckResult:
    """Run the ONNX at ``path`` in onnxruntime and ``reference`` on the same ``batches`` and compare.

    ``batches`` yields input tensors or ``(input, label)`` pairs. ``lsb`` defaults to the output
    quantizer's step from the export JSON. Returns max |diff|, the diff in output LSBs, the fraction of
    elements within 1 LSB, and the top-1 agreement.
    """
    runner = OnnxRunner(path, optimize, threads)
    was_training = isinstance(reference, torch.nn.Module) and reference.training
    if lsb is None and not isinstance(path, onnx.ModelProto):
        lsb = output_lsb(path)
    n = 0
    max_diff = 0.0
    within = exact = elems = agree = 0
    try:
        if isinstance(reference, torch.nn.Module):
            reference.eval()
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            y = runner(x)
            ref = reference(x)
            ref = first_output(ref).detach().cpu().float()
            if y.shape != ref.shape:
                raise ValueError(f"onnx_check: the ONNX output has shape {tuple(y.shape)}, the reference "
                                 f"{tuple(ref.shape)}")
            d = (y - ref).abs()
            max_diff = max(max_diff, float(d.max()))
            elems += d.numel()
            exact += int((d == 0).sum())
            if lsb:
                within += int((d <= lsb * (1 + 1e-6)).sum())
            if y.dim() == 2:
                agree += int((y.argmax(1) == ref.argmax(1)).sum())
            n += x.shape[0]
    finally:
        if was_training:
            reference.train()
    if n == 0:
        raise ValueError("onnx_check: `batches` yielded nothing")
    two_d = y.dim() == 2
    return CheckResult(n=n, max_abs_diff=max_diff, lsb=lsb, max_lsb_diff=max_diff / lsb if lsb else None,
                       frac_within_1_lsb=within / elems if lsb else None, frac_exact=exact / elems,
                       top1_agreement=agree / n if two_d else None)


@torch.no_grad()
def onnx_accuracy(model: str | Path | onnx.ModelProto, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                  optimize: bool = True, threads: int = 0) -> float:
    """Top-1 accuracy in percent of an ONNX classifier on ``(input, label)`` batches."""
    runner = OnnxRunner(model, optimize, threads)
    correct = total = 0
    for x, y in batches:
        correct += int((runner(x).argmax(1) == y.cpu()).sum())
        total += y.numel()
    return 100.0 * correct / max(total, 1)
