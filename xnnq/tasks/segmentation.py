"""Semantic segmentation: image + mask folders, aligned augmentation, mIoU, evaluation and TIDL export.

``data_dir`` holds ``<split>/images/<stem>.jpg`` and ``<split>/masks/<stem>.png`` (VOC-style: the same
stem, 8-bit PNG class-index masks; pixels equal to ``ignore_index`` count nowhere). Images are decoded
once per process into uint8 tensors; :func:`batches` yields ``(images, masks)`` as the net takes them
(normalized float N x 3 x H x W, int64 N x H x W).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data import normalize

IGNORE_INDEX = 255
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


# ----------------------------------------------------------------------------------------------- data
def load_folder_pair(
    image_dir: str | Path, mask_dir: str | Path, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Decode matching images and masks: ``(uint8 N x 3 x H x W, uint8 N x H x W, stems)``.

    Pairs are matched by file stem, sorted; an image without a mask (or a mask of another size) is an
    error naming the file. Masks must be single-channel index PNGs (mode ``L`` or ``P``): a palette PNG
    is read as its indices, never as colours.
    """
    image_dir, mask_dir = Path(image_dir), Path(mask_dir)
    for d in (image_dir, mask_dir):
        if not d.is_dir():
            raise FileNotFoundError(
                f"{d} does not exist (expected <data_dir>/<split>/images and /masks; "
                "set XNNQ_DATA or pass data_dir)"
            )
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise ValueError(f"{image_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    if limit is not None:
        images = images[:limit]
    xs, ms = [], []
    for path in images:
        mpath = mask_dir / (path.stem + ".png")
        if not mpath.is_file():
            raise FileNotFoundError(f"no mask {mpath} for image {path} (masks are <stem>.png beside images/)")
        img = Image.open(path).convert("RGB")
        mask = Image.open(mpath)
        if mask.mode not in ("L", "P"):
            raise ValueError(
                f"{mpath}: mask mode {mask.mode!r}; expected a single-channel index PNG (L or P)"
            )
        if mask.size != img.size:
            raise ValueError(f"{mpath}: mask size {mask.size} differs from image size {img.size} ({path})")
        xs.append(np.asarray(img, dtype=np.uint8))
        ms.append(np.asarray(mask, dtype=np.uint8))
    if len({x.shape for x in xs}) != 1:
        raise ValueError(f"{image_dir}: images of different sizes; resize them to one size first")
    x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).contiguous()
    return x, torch.from_numpy(np.stack(ms)), [p.stem for p in images]


_CACHE: dict[tuple[str, int | None], tuple[torch.Tensor, torch.Tensor]] = {}


def load_split(
    data_dir: str | Path, split: str, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(uint8 images, uint8 masks)`` of ``<data_dir>/<split>``, decoded once per process."""
    root = Path(data_dir) / split
    key = (str(root.resolve()), limit)
    if key not in _CACHE:
        x, m, _ = load_folder_pair(root / "images", root / "masks", limit)
        _CACHE[key] = (x, m)
    return _CACHE[key]


def augment(
    images: torch.Tensor,
    masks: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    scale: tuple[float, float] = (0.75, 1.25),
    flip: bool = True,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random scale, crop/pad back to the input size and horizontal flip, the same for image and mask.

    Images (uint8) resize bilinearly, masks by nearest-exact (the same pixel-centre convention, so the
    two stay aligned to the sub-pixel), so a mask never gains a class value that was
    not there; padded mask pixels are ``ignore_index``, padded image pixels 0. Returns uint8 tensors
    of the input shapes.
    """
    n, _, h, w = images.shape
    out_x, out_m = torch.zeros_like(images), torch.full_like(masks, ignore_index)
    s = torch.empty(n).uniform_(scale[0], scale[1], generator=generator)
    u = torch.rand(n, 2, generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    for i in range(n):
        sh, sw = max(1, round(h * float(s[i]))), max(1, round(w * float(s[i])))
        xi = F.interpolate(images[i : i + 1].float(), size=(sh, sw), mode="bilinear", align_corners=False)
        xi = xi.round_().clamp_(0, 255).to(images.dtype)[0]
        mi = F.interpolate(masks[i : i + 1, None].float(), size=(sh, sw), mode="nearest-exact")[0, 0].to(
            masks.dtype
        )
        # source window (crop when larger) and destination offset (pad when smaller), per axis
        oy, ox = int(u[i, 0] * (abs(sh - h) + 1)), int(u[i, 1] * (abs(sw - w) + 1))
        oy, ox = min(oy, abs(sh - h)), min(ox, abs(sw - w))
        sy, dy = (oy, 0) if sh >= h else (0, oy)
        sx, dx = (ox, 0) if sw >= w else (0, ox)
        ch, cw = min(h, sh), min(w, sw)
        out_x[i, :, dy : dy + ch, dx : dx + cw] = xi[:, sy : sy + ch, sx : sx + cw]
        out_m[i, dy : dy + ch, dx : dx + cw] = mi[sy : sy + ch, sx : sx + cw]
        if flips[i]:
            out_x[i], out_m[i] = out_x[i].flip(-1), out_m[i].flip(-1)
    return out_x, out_m


def random_crop(
    images: torch.Tensor, masks: torch.Tensor, size: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One random ``size`` x ``size`` window, the same for every image of the batch and its mask."""
    h, w = images.shape[-2:]
    if size > min(h, w):
        raise ValueError(f"random_crop: size {size} is larger than the images ({h} x {w})")
    top = int(torch.randint(0, h - size + 1, (1,), generator=generator))
    left = int(torch.randint(0, w - size + 1, (1,), generator=generator))
    return images[..., top : top + size, left : left + size], masks[..., top : top + size, left : left + size]


def batches(
    data_dir: str | Path,
    split: str,
    *,
    batch_size: int,
    limit: int | None = None,
    train: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(images, masks)``: normalized float N x 3 x H x W and int64 N x H x W class indices.

    ``train=True`` shuffles and applies :func:`augment` (scale, crop, flip, masks aligned).
    """
    images, masks = load_split(data_dir, split, limit)
    n = images.shape[0]
    order = torch.randperm(n, generator=generator) if train else torch.arange(n)
    for i in range(0, n, batch_size):
        idx = order[i : i + batch_size]
        xb, mb = images[idx], masks[idx]
        if train:
            xb, mb = augment(xb, mb, generator)
        yield normalize(xb.to(device)), mb.to(device).long()


# -------------------------------------------------------------------------------------------- metrics
def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = IGNORE_INDEX
) -> torch.Tensor:
    """``num_classes x num_classes`` int64 counts, rows = ground truth, columns = prediction.

    One ``torch.bincount`` on the device of the inputs; pixels whose target is ``ignore_index`` (or
    outside ``[0, num_classes)``) are left out. A prediction outside the range is an error.
    """
    target, pred = target.reshape(-1).long(), pred.reshape(-1).long()
    keep = (target >= 0) & (target < num_classes)
    if ignore_index is not None:
        keep &= target != ignore_index
    target, pred = target[keep], pred[keep]
    return torch.bincount(
        target * num_classes + pred.clamp(0, num_classes - 1), minlength=num_classes * num_classes
    ).reshape(num_classes, num_classes)


def scores(confusion: torch.Tensor) -> dict[str, float]:
    """``{"mIoU", "pixel_acc"}`` in percent from an accumulated confusion matrix.

    IoU_c = TP / (TP + FP + FN) over the whole data set; classes that appear neither in the ground
    truth nor in the predictions are left out of the mean (as in torchmetrics / mmseg "nan" classes).
    """
    cm = confusion.double()
    tp = cm.diag()
    union = cm.sum(0) + cm.sum(1) - tp
    present = union > 0
    iou = tp[present] / union[present]
    total = cm.sum()
    return {
        "mIoU": float(iou.mean() * 100) if present.any() else float("nan"),
        "pixel_acc": float(tp.sum() / total * 100) if total > 0 else float("nan"),
    }


# ----------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(
    model_or_onnx_path,
    data_dir: str | Path,
    split: str = "val",
    *,
    batch_size: int = 50,
    limit: int | None = None,
    num_classes: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    progress: bool = False,
) -> dict[str, float]:
    """``{"mIoU", "pixel_acc"}`` (0-100) of a model on ``<data_dir>/<split>``.

    ``model_or_onnx_path`` is a float ``nn.Module`` or any xnnq wrapper (evaluated in eval mode, its
    training flag restored afterwards), or the path of an exported ONNX file. The model may output
    logits N x C x H x W or an index map (N x 1 x H x W or N x H x W, e.g. after the export's ArgMax).
    An ONNX file exported with ``format="tidl"`` runs through the TIDL emulation
    (:func:`xnnq.export.emulate.tidl_emulation`: TIDL's quantization of the float graph, in onnxruntime);
    a ``qdq`` file (or any other ONNX) runs as it is in onnxruntime. ``num_classes`` defaults to the
    model's output channels (or, for an ONNX ending in ArgMax, the channels entering it).
    """
    if isinstance(model_or_onnx_path, (str, Path)):
        run = _onnx_runner(Path(model_or_onnx_path))
        num_classes = num_classes or run.num_classes
        restore = None
    else:
        model = model_or_onnx_path
        restore = model.training
        model.eval()
        device = next((p.device for p in model.parameters()), torch.device("cpu"))

        def run(x: torch.Tensor) -> torch.Tensor:
            return model(x.to(device))

    cm = None
    images = load_split(data_dir, split, limit)[0]
    it = batches(data_dir, split, batch_size=batch_size, limit=limit)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, total=-(-images.shape[0] // batch_size), desc=f"eval {split}", leave=False)
    try:
        for x, m in it:
            out = run(x)
            if isinstance(out, dict):  # torchvision segmentation models
                out = out["out"]
            if out.dim() == 4 and out.shape[1] > 1:
                n_cls = num_classes or out.shape[1]
                pred = out.argmax(1)
            else:
                if num_classes is None:
                    raise ValueError("the model outputs an index map: pass num_classes to evaluate()")
                n_cls, pred = num_classes, out.reshape(m.shape)
            part = confusion_matrix(pred, m.to(pred.device), n_cls, ignore_index)
            cm = part if cm is None else cm + part
    finally:
        if restore is not None:
            model.train(restore)
    return scores(cm.cpu())


def onnx_num_classes(model) -> int | None:
    """The class count of an exported segmentation ONNX: the channels entering its ``ArgMax`` (None: no ArgMax)."""
    graph = model.graph
    node = next((n for n in graph.node if n.op_type == "ArgMax"), None)
    if node is None:
        return None
    for vi in list(graph.value_info) + list(graph.output) + list(graph.input):
        if vi.name == node.input[0]:
            dims = vi.type.tensor_type.shape.dim
            return int(dims[1].dim_value) if len(dims) == 4 and dims[1].dim_value > 0 else None
    return None


def _onnx_runner(path: Path):
    """A callable on torch batches for an exported ONNX; a ``tidl`` export runs through the TIDL emulation."""
    import onnx

    from ..export.check import OnnxRunner
    from ..export.emulate import tidl_emulation
    from ..export.options import options_path, read_options

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ONNX file")
    fmt = read_options(path).get("format") if options_path(path).is_file() else None
    model = tidl_emulation(path) if fmt == "tidl" else onnx.load(str(path))
    runner = OnnxRunner(model)
    runner.num_classes = onnx_num_classes(model)
    return runner


# --------------------------------------------------------------------------------------------- export
def export(
    qmodel,
    path: str | Path,
    *,
    format: str = "tidl",
    argmax: bool = True,
    input_shape: tuple[int, ...] | None = None,
    **kwargs,
) -> Path:
    """Export a quantized segmentation model as TI's segmentation models are exported; returns the ONNX path.

    ``xnnq.export_onnx`` with ``argmax=True`` by default: the graph ends in ``ArgMax`` over the class axis
    (keepdims, int64), so the device writes a one-channel index map. ``input_shape`` defaults to the
    wrapper's dummy input with batch 1; other keyword arguments go to ``export_onnx``. The TIDL options
    JSON is written beside the file (``<stem>.tidl.json``).
    """
    from ..export import export_onnx

    if input_shape is None:
        shapes = getattr(qmodel, "dummy_shapes", None)
        if not shapes:
            raise ValueError(
                "export: pass input_shape=(1, 3, H, W); the model does not record its dummy input"
            )
        input_shape = (1, *shapes[0][1:])
    device = next((p.device for p in qmodel.parameters()), torch.device("cpu"))
    return export_onnx(
        qmodel, torch.zeros(input_shape, device=device), path, format=format, argmax=argmax, **kwargs
    ).path
