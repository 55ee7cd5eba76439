"""xnnq.tasks.segmentation: mask folders, aligned augmentation, confusion-matrix mIoU, ArgMax export."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from torch import nn

import xnnq
from xnnq.data import MEAN, STD
from xnnq.export.check import ort_session
from xnnq.export.options import read_options
from xnnq.tasks import segmentation as seg

# ------------------------------------------------------------------------------------------- helpers


def _blocks(rng: np.random.Generator, h: int, w: int, classes: int, block: int = 8) -> np.ndarray:
    """A mask of constant ``block`` x ``block`` tiles with random classes."""
    tiles = rng.integers(0, classes, (h // block, w // block)).astype(np.uint8)
    return np.kron(tiles, np.ones((block, block), np.uint8))


def _write_pair_folder(root, split: str, n: int, size: int = 32, classes: int = 4, seed: int = 0):
    """``root/split/{images,masks}``: PNG images whose red channel is ``40 * mask`` (lossless)."""
    rng = np.random.default_rng(seed)
    (root / split / "images").mkdir(parents=True)
    (root / split / "masks").mkdir(parents=True)
    masks = []
    for i in range(n):
        m = _blocks(rng, size, size, classes)
        img = np.stack([m * 40, rng.integers(0, 255, m.shape), np.full_like(m, 7)], -1).astype(np.uint8)
        Image.fromarray(img).save(root / split / "images" / f"{i:04d}.png")
        Image.fromarray(m, mode="L").save(root / split / "masks" / f"{i:04d}.png")
        masks.append(m)
    return np.stack(masks)


# ----------------------------------------------------------------------------------------------- data


def test_folder_pair_loads_images_and_index_masks(tmp_path):
    masks = _write_pair_folder(tmp_path, "val", 3)
    x, m, stems = seg.load_folder_pair(tmp_path / "val" / "images", tmp_path / "val" / "masks")
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.uint8
    assert m.shape == (3, 32, 32) and m.dtype == torch.uint8
    assert stems == ["0000", "0001", "0002"]
    assert torch.equal(m, torch.from_numpy(masks))
    assert torch.equal(x[:, 0], m * 40)  # the red channel encodes the mask: image and mask belong together


def test_palette_mask_is_read_as_indices(tmp_path):
    _write_pair_folder(tmp_path, "val", 1)
    idx = np.asarray(Image.open(tmp_path / "val" / "masks" / "0000.png"))
    pal = Image.fromarray(idx, mode="P")
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9] + [0] * 756)  # colours unrelated to the indices
    pal.save(tmp_path / "val" / "masks" / "0000.png")
    _, m, _ = seg.load_folder_pair(tmp_path / "val" / "images", tmp_path / "val" / "masks")
    assert torch.equal(m[0], torch.from_numpy(idx))


def test_missing_or_bad_masks_are_named(tmp_path):
    _write_pair_folder(tmp_path, "val", 2)
    (tmp_path / "val" / "masks" / "0001.png").unlink()
    with pytest.raises(FileNotFoundError, match="0001.png"):
        seg.load_folder_pair(tmp_path / "val" / "images", tmp_path / "val" / "masks")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "val" / "masks" / "0001.png")
    with pytest.raises(ValueError, match="single-channel index PNG"):
        seg.load_folder_pair(tmp_path / "val" / "images", tmp_path / "val" / "masks")
    with pytest.raises(FileNotFoundError, match="images"):
        seg.load_folder_pair(tmp_path / "nowhere" / "images", tmp_path / "val" / "masks")


def _ramp_pair(n: int = 8, size: int = 64, axis: int = -1):
    """Images whose red / green channel is 4 x the source column / row; masks = source column (or row) // 8."""
    ramp = (torch.arange(size) * 4).to(torch.uint8)
    x = torch.zeros(n, 3, size, size, dtype=torch.uint8)
    x[:, 0] = ramp.view(1, 1, size)
    x[:, 1] = ramp.view(1, size, 1)
    idx = (torch.arange(size) // 8).to(torch.uint8)
    m = (idx.view(1, 1, size) if axis == -1 else idx.view(1, size, 1)).expand(n, size, size).contiguous()
    return x, m


@pytest.mark.parametrize("axis", [-1, -2])
def test_augmentation_keeps_masks_aligned(axis):
    x, m = _ramp_pair(axis=axis)
    xa, ma = seg.augment(x, m, torch.Generator().manual_seed(3), scale=(0.6, 1.4))
    assert xa.shape == x.shape and ma.shape == m.shape and ma.dtype == m.dtype
    valid = ma != seg.IGNORE_INDEX
    assert set(ma[valid].unique().tolist()) <= set(m.unique().tolist())  # nearest: no new class values
    assert (~valid).any() and int(
        xa[:, 2][~valid].max()
    ) == 0  # padded image pixels are 0, masks ignore_index
    # the source coordinate each output pixel of the image came from (bilinear, to 1/8 pixel) ...
    u = xa[:, 0 if axis == -1 else 1].float() / 4
    # ... must be the one the mask pixel came from: nearest source pixel of u, away from rounding ties and
    # from the border with the zero padding (where the image blends with black)
    inner = -torch.nn.functional.max_pool2d(-valid[:, None].float(), 3, 1, 1)[:, 0] > 0
    sure = inner & ((u - u.floor() - 0.5).abs() > 0.13)
    assert sure.sum() > 0.3 * valid.numel()
    assert torch.equal(ma[sure].long(), (u[sure].round() // 8).long())
    # horizontal flips: some images come out mirrored (image and mask together, checked above)
    flipped = sum(int(u[i, 32, 40] < u[i, 32, 20]) for i in range(len(u))) if axis == -1 else 1
    assert flipped > 0
    # without scaling the pair is moved exactly: image = 4 * (mask pixel's source column) in every valid pixel
    xa, ma = seg.augment(x, m, torch.Generator().manual_seed(3), scale=(1.0, 1.0))
    assert torch.equal(ma.long(), (xa[:, 0 if axis == -1 else 1].long() // 4) // 8)


def test_batches_yield_normalized_images_and_long_masks(tmp_path):
    _write_pair_folder(tmp_path, "train", 5)
    out = list(seg.batches(tmp_path, "train", batch_size=2))
    assert [tuple(x.shape) for x, _ in out] == [(2, 3, 32, 32), (2, 3, 32, 32), (1, 3, 32, 32)]
    x, m = out[0]
    assert x.dtype == torch.float32 and m.dtype == torch.int64
    raw = seg.load_split(tmp_path, "train")[0][:2].float() / 255
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (raw - mean) / std)
    g = torch.Generator().manual_seed(0)
    n = sum(len(m) for _, m in seg.batches(tmp_path, "train", batch_size=2, train=True, generator=g))
    assert n == 5
    assert sum(len(m) for _, m in seg.batches(tmp_path, "train", batch_size=2, limit=3)) == 3


# -------------------------------------------------------------------------------------------- metrics


def test_miou_hand_case():
    target = torch.tensor([0, 0, 1, 1])
    pred = torch.tensor([0, 1, 1, 1])
    cm = seg.confusion_matrix(pred, target, 2)
    assert cm.tolist() == [[1, 1], [0, 2]]
    s = seg.scores(cm)
    # IoU0 = 1 / (1 + 1 + 0) = 1/2; IoU1 = 2 / (2 + 1 + 0) = 2/3
    assert s["mIoU"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)
    assert s["pixel_acc"] == pytest.approx(75.0)


def test_miou_perfect_ignore_and_absent_classes():
    t = torch.tensor([[0, 1, 2, 255]])
    assert seg.scores(seg.confusion_matrix(t.clone().clamp(max=2), t, 4)) == {
        "mIoU": 100.0,
        "pixel_acc": 100.0,
    }
    # class 3 appears nowhere: left out of the mean; the ignored pixel counts nowhere
    p = torch.tensor([[0, 1, 1, 0]])
    cm = seg.confusion_matrix(p, t, 4)
    assert int(cm.sum()) == 3
    # IoU0 = 1/1, IoU1 = 1/2 (pred 1 twice, gt once), IoU2 = 0/1
    assert seg.scores(cm)["mIoU"] == pytest.approx(100 * (1 + 0.5 + 0) / 3)
    # a class predicted but absent from the ground truth counts with IoU 0
    cm = seg.confusion_matrix(torch.tensor([3, 0]), torch.tensor([0, 0]), 4)
    assert seg.scores(cm)["mIoU"] == pytest.approx(100 * (0.5 + 0.0) / 2)


def test_miou_accumulates_pixels_not_images():
    # image A: 1 pixel of class 1, wrong; image B: 99 pixels of class 1, right (plus background)
    ta, pa = torch.tensor([1, 0]), torch.tensor([0, 0])
    tb, pb = torch.tensor([1] * 99 + [0]), torch.tensor([1] * 99 + [0])
    cm = seg.confusion_matrix(pa, ta, 2) + seg.confusion_matrix(pb, tb, 2)
    s = seg.scores(cm)
    # global: IoU0 = 2/3, IoU1 = 99/100; a per-image mean would give ((0.5 + 0) / 2 + 1) / 2 = 0.625
    assert s["mIoU"] == pytest.approx(100 * (2 / 3 + 0.99) / 2)
    assert s["pixel_acc"] == pytest.approx(100 * 101 / 102)
    assert torch.equal(cm, seg.confusion_matrix(torch.cat([pa, pb]), torch.cat([ta, tb]), 2))


# ---------------------------------------------------------------------------------------- ArgMax export


class TinySeg(nn.Module):
    """Conv stem, a skip Concat, x2 resize and a classifier: the ops a lite segmentation net uses."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.deep = nn.Sequential(
            nn.Conv2d(8, 8, 3, 1, 2, dilation=2, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        )
        self.cls = nn.Conv2d(16, classes, 1)
        self.up = xnnq.layers.resize.ResizeWith(2.0, "bilinear", False)

    def forward(self, x):
        s = self.stem(x)
        return self.up(self.cls(torch.cat([self.deep(s), s], 1)))


@pytest.fixture(scope="module")
def tiny_qat(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("segdata")
    _write_pair_folder(root, "val", 6, classes=4)
    model = TinySeg()
    q = xnnq.QuantTrainModule(model, torch.randn(1, 3, 32, 32))
    opt = torch.optim.SGD(q.parameters(), lr=0.05)
    for x, m in seg.batches(
        root, "val", batch_size=3, train=True, generator=torch.Generator().manual_seed(0)
    ):
        loss = nn.functional.cross_entropy(q(x), m, ignore_index=seg.IGNORE_INDEX)
        opt.zero_grad()
        loss.backward()
        opt.step()
    q.eval()
    return q, root


@pytest.mark.parametrize("fmt", ["tidl", "qdq"])
def test_argmax_export_in_onnxruntime(tiny_qat, tmp_path, fmt):
    q, root = tiny_qat
    path = seg.export(q, tmp_path / f"tiny_{fmt}.onnx", format=fmt)
    model = onnx.load(str(path))
    last = model.graph.node[-1]
    assert last.op_type == "ArgMax"
    attrs = {a.name: a.i for a in last.attribute}
    assert attrs == {"axis": -3, "keepdims": 1, "select_last_index": 0}  # TIDL's supported ArgMax form
    out = model.graph.output[0]
    assert out.type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert [d.dim_value for d in out.type.tensor_type.shape.dim] == [1, 1, 32, 32]
    assert seg.onnx_num_classes(model) == 4
    opts = read_options(path)
    assert opts["argmax"] is True and opts["format"] == fmt

    x = next(seg.batches(root, "val", batch_size=6))[0]
    with torch.no_grad():
        ref = q(x).argmax(1, keepdim=True)
    if fmt == "qdq":  # the QDQ graph runs the simulation's numerics: the same index map
        sess = ort_session(path)
        got = np.concatenate([sess.run(None, {"input": x[i : i + 1].numpy()})[0] for i in range(6)])
        assert got.dtype == np.int64
        assert (torch.from_numpy(got) == ref).float().mean() == 1.0
    # both formats evaluate through the ONNX path (tidl: TIDL emulation) to the simulation's mIoU
    s_onnx = seg.evaluate(path, root, "val")
    s_sim = seg.evaluate(q, root, "val")
    assert s_onnx["mIoU"] == pytest.approx(s_sim["mIoU"], abs=1e-9)
    assert s_onnx["pixel_acc"] == pytest.approx(s_sim["pixel_acc"], abs=1e-9)
    assert not q.training


def test_export_without_argmax_keeps_logits(tiny_qat, tmp_path):
    q, _ = tiny_qat
    path = seg.export(q, tmp_path / "logits.onnx", format="qdq", argmax=False)
    model = onnx.load(str(path))
    assert all(n.op_type != "ArgMax" for n in model.graph.node)
    assert [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim] == [1, 4, 32, 32]


def test_argmax_on_a_classifier_is_refused(tmp_path):
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    q = xnnq.QuantTrainModule(model, torch.randn(1, 3, 2, 2))
    q(torch.randn(4, 3, 2, 2))
    q.eval()
    with pytest.raises(ValueError, match="N x C x H x W"):
        xnnq.export_onnx(q, torch.randn(1, 3, 2, 2), tmp_path / "c.onnx", argmax=True)


def test_evaluate_restores_training_mode(tiny_qat):
    q, root = tiny_qat
    q.train()
    try:
        seg.evaluate(q, root, "val", limit=2)
        assert q.training
    finally:
        q.eval()
