"""Object detection, the task's public face: COCO batches, decode + NMS + COCOeval, TIDL OD export.

    from xnnq.tasks import detection
    for images, targets in detection.batches("val/instances.json", batch_size=32): ...
    detection.evaluate(model_or_qmodel_or_onnx_path, "val/instances.json")   # {"mAP": .., "mAP50": ..}
    detection.export(qmodel, "out/det.onnx", format="tidl")   # + det.tidl.json + det.prototxt

The model is a *traceable core*: a normalised image batch in, the raw head conv outputs out (a flat
tuple). What those outputs mean is an :class:`~xnnq.tasks.ssd.SSDMetaArch` (``model.meta_arch``, or
``meta_arch=``; for an ONNX file it is read back from the prototxt written beside it). Decoding and NMS
run outside the graph, as TIDL's detection post-processing does.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from .coco import CocoBatches, CocoSet, iterate, load_coco
from .ssd import SSDMetaArch, decode, flatten_outputs, priors_and_variances

__all__ = ["batches", "coco_map", "evaluate", "export", "find_meta_arch", "postprocess"]


def batches(
    instances_json: str | Path,
    *,
    batch_size: int,
    limit: int | None = None,
    train: bool = False,
    size: int | tuple[int, int] | None = None,
    seed: int = 0,
    epoch: int = 0,
) -> CocoBatches:
    """``(images, targets)`` of a COCO detection set, images normalised exactly as the detector takes them.

    A re-iterable with ``len()`` (one pass = one epoch), as ``xnnq.recipes.qat_finetune`` takes it.

    ``targets[i]``: ``boxes`` (M x 4 corners in input pixels), ``labels`` (index into the sorted category
    ids), ``image_id``, ``scale`` (input / original size). ``train=True`` shuffles (seeded by ``seed``
    and ``epoch``; every pass differs) and augments (horizontal flip, scale 0.75-1.25, translation ±10 %, boxes kept right).
    ``size`` resizes every image (needed when the set's images differ in size).
    """
    ds = load_coco(instances_json, size=size, limit=limit)
    return CocoBatches(ds, batch_size=batch_size, train=train, seed=seed, epoch=epoch)


def find_meta_arch(model: Any, meta_arch: SSDMetaArch | None = None) -> SSDMetaArch:
    """``meta_arch`` if given, else ``model.meta_arch`` (also looked up on a wrapper's original)."""
    if meta_arch is not None:
        return meta_arch
    for m in (model, getattr(model, "module", None)):
        found = getattr(m, "meta_arch", None)
        if isinstance(found, SSDMetaArch):
            return found
    raise ValueError(
        f"{type(model).__name__} carries no meta-architecture: pass meta_arch=float_model.meta_arch "
        "(an xnnq.tasks.ssd.SSDMetaArch describing the head outputs)"
    )


def postprocess(
    meta: SSDMetaArch,
    outputs,
    *,
    confidence_threshold: float | None = None,
    nms_threshold: float | None = None,
    top_k: int | None = None,
    keep_top_k: int | None = None,
) -> list[dict[str, Tensor]]:
    """caffe-SSD ``DetectionOutput``: softmax, per class score > threshold, ``top_k`` per class, NMS per
    class, ``keep_top_k`` per image. Returns per image ``boxes`` (corners, input pixels), ``scores``,
    ``labels`` (foreground index 0..K-1)."""
    thr = meta.confidence_threshold if confidence_threshold is None else confidence_threshold
    iou = meta.nms_threshold if nms_threshold is None else nms_threshold
    top_k = meta.top_k if top_k is None else top_k
    keep = meta.keep_top_k if keep_top_k is None else keep_top_k
    loc, conf, sizes = flatten_outputs(meta, [torch.as_tensor(o).float() for o in outputs])
    priors, var = priors_and_variances(meta, sizes)
    boxes = decode(loc, priors.to(loc.device), var.to(loc.device))
    boxes = boxes * torch.tensor([meta.in_width, meta.in_height] * 2, device=loc.device, dtype=loc.dtype)
    scores = conf.softmax(-1)[..., meta.foreground]  # N x P x K
    results = []
    k = scores.shape[-1]
    for b, s in zip(boxes, scores):
        prior_idx, cls = (s > thr).nonzero(as_tuple=True)
        sc = s[prior_idx, cls]
        # top_k per class: sort by score, then stably by class; rank within each class block
        order = sc.argsort(descending=True)
        order = order[cls[order].argsort(stable=True)]
        counts = torch.bincount(cls, minlength=k)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(len(order), device=order.device) - starts[cls[order]]
        order = order[rank < top_k]
        bx, sc, cl = b[prior_idx[order]], sc[order], cls[order]
        kept = batched_nms(bx, sc, cl, iou)[:keep]  # sorted by decreasing score
        results.append({"boxes": bx[kept], "scores": sc[kept], "labels": cl[kept]})
    return results


def _run_model(model: torch.nn.Module):
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    model.eval()

    def run(x: Tensor):
        with torch.no_grad():
            return model(x.to(device))

    return run


def _run_onnx(path: Path, threads: int = 0):
    import numpy as np

    from ..export.check import ort_session
    from ..export.emulate import tidl_emulation
    from ..export.options import read_options

    try:
        fmt = read_options(path).get("format")
    except FileNotFoundError:  # an ONNX from elsewhere (e.g. onnxruntime's quantize_static): run it as it is
        fmt = None
    session = ort_session(tidl_emulation(path) if fmt == "tidl" else path, threads=threads)
    inp = session.get_inputs()[0]
    static = inp.shape[0] if isinstance(inp.shape[0], int) else None

    def run(x: Tensor):
        x = x.detach().cpu().float().numpy()
        b = static or x.shape[0]
        chunks = []
        for i in range(0, x.shape[0], b):
            c = x[i : i + b]
            n = len(c)
            if n < b:
                c = np.concatenate([c, np.zeros((b - n, *c.shape[1:]), c.dtype)])
            chunks.append([o[:n] for o in session.run(None, {inp.name: c})])
        return tuple(torch.from_numpy(np.concatenate([c[j] for c in chunks])) for j in range(len(chunks[0])))

    return run


_GT: dict[tuple[str, float], Any] = {}


def coco_map(ds: CocoSet, detections: list[dict], image_ids: list[int]) -> dict[str, float]:
    """COCOeval (bbox) of ``detections`` (COCO result dicts) on ``image_ids`` of ``ds``: mAP and mAP50, 0-100."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        key = (str(ds.path), ds.path.stat().st_mtime)
        if key not in _GT:
            _GT[key] = COCO(str(ds.path))
        gt = _GT[key]
        if not detections:
            return {"mAP": 0.0, "mAP50": 0.0}
        dt = gt.loadRes(detections)
        ev = COCOeval(gt, dt, "bbox")
        ev.params.imgIds = list(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"mAP": float(ev.stats[0]) * 100, "mAP50": float(ev.stats[1]) * 100}


def evaluate(
    model_or_onnx_path: torch.nn.Module | str | Path,
    instances_json: str | Path,
    *,
    batch_size: int = 32,
    limit: int | None = None,
    meta_arch: SSDMetaArch | None = None,
    size: int | tuple[int, int] | None = None,
    progress: bool = True,
    threads: int = 0,
    return_detections: bool = False,
) -> dict[str, Any]:
    """COCO mAP@[.5:.95] and mAP@.5 (0-100) of a detector on a COCO-format set.

    ``model_or_onnx_path``: the float core, any xnnq wrapper of it, or an exported ``.onnx`` (run in
    onnxruntime; a ``format="tidl"`` file through the TIDL emulation; its meta-architecture from the
    prototxt beside it). The same decode + NMS + COCOeval follow in every case.
    """
    from tqdm.auto import tqdm

    if isinstance(model_or_onnx_path, (str, Path)):
        path = Path(model_or_onnx_path)
        if meta_arch is None:
            from .meta_arch import read_prototxt

            meta_arch = read_prototxt(path.with_suffix(".prototxt"))
        run = _run_onnx(path, threads)
        meta = meta_arch
    else:
        meta = find_meta_arch(model_or_onnx_path, meta_arch)
        run = _run_model(model_or_onnx_path)
    ds = load_coco(instances_json, size=size, limit=limit)
    if (ds.images.shape[-1], ds.images.shape[-2]) != (meta.in_width, meta.in_height):
        raise ValueError(
            f"{instances_json}: images are {ds.images.shape[-1]}x{ds.images.shape[-2]} but the detector "
            f"takes {meta.in_width}x{meta.in_height}; pass size=({meta.in_height}, {meta.in_width})"
        )
    dets: list[dict] = []
    n_batches = (len(ds) + batch_size - 1) // batch_size
    for images, targets in tqdm(
        iterate(ds, batch_size=batch_size),
        total=n_batches,
        desc="evaluate",
        disable=not progress,
        leave=False,
    ):
        for t, r in zip(targets, postprocess(meta, run(images))):
            sx, sy = t["scale"]
            b = r["boxes"].cpu().double()
            b[:, [0, 2]] /= sx
            b[:, [1, 3]] /= sy
            for box, score, label in zip(b.tolist(), r["scores"].cpu().tolist(), r["labels"].cpu().tolist()):
                dets.append(
                    {
                        "image_id": t["image_id"],
                        "category_id": ds.cat_ids[label],
                        "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                        "score": score,
                    }
                )
    out: dict[str, Any] = coco_map(ds, dets, ds.image_ids)
    if return_detections:
        out["detections"] = dets
    return out


def export(
    qmodel: Any,
    path: str | Path,
    *,
    format: str = "tidl",
    meta_arch: SSDMetaArch | None = None,
    dummy_input: Tensor | None = None,
    **kwargs,
) -> Path:
    """Write the ONNX (``xnnq.export_onnx``), its options JSON with TIDL's object-detection options, and
    the meta-architecture prototxt beside it; returns the ONNX path. See :mod:`xnnq.tasks.meta_arch`."""
    from .meta_arch import export_detector

    return export_detector(
        qmodel,
        path,
        format=format,
        meta_arch=find_meta_arch(qmodel, meta_arch),
        dummy_input=dummy_input,
        **kwargs,
    )


def write_json(path: str | Path, obj: dict) -> None:
    Path(path).write_text(json.dumps(obj, indent=2) + "\n")
