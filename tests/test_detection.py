"""Detection task: COCO loading and augmentation, caffe-SSD priors/coding, decode + NMS, prototxt, evaluate."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
import torch
from PIL import Image
from torch import nn

import xnnq
from xnnq.data import MEAN, STD, data_root
from xnnq.export.options import read_options
from xnnq.tasks import detection
from xnnq.tasks.coco import augment, load_coco
from xnnq.tasks.meta_arch import head_conv, parse_prototxt, prototxt_text, read_prototxt
from xnnq.tasks.ssd import PriorBoxParam, SSDMetaArch, decode, encode, level_priors, match, multibox_loss


# ------------------------------------------------------------------------------------------ COCO data
def write_coco(root, sizes=((40, 30), (40, 30), (40, 30))):
    """Three small images with known boxes; category ids 3 and 7 (not contiguous); one crowd box."""
    (root / "images").mkdir(parents=True)
    images, anns = [], []
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
        images.append({"id": 10 + i, "file_name": f"images/{i}.png", "width": w, "height": h})
    anns.append(
        {"id": 1, "image_id": 10, "category_id": 7, "bbox": [2, 3, 10, 12], "area": 120, "iscrowd": 0}
    )
    anns.append({"id": 2, "image_id": 10, "category_id": 3, "bbox": [20, 5, 8, 6], "area": 48, "iscrowd": 0})
    anns.append(
        {"id": 3, "image_id": 11, "category_id": 3, "bbox": [0, 0, 40, 30], "area": 1200, "iscrowd": 1}
    )
    anns.append({"id": 4, "image_id": 12, "category_id": 7, "bbox": [5, 5, 0, 4], "area": 0, "iscrowd": 0})
    data = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}],
    }
    (root / "instances.json").write_text(json.dumps(data))
    return root / "instances.json"


def test_coco_loading(tmp_path):
    path = write_coco(tmp_path / "set")
    ds = load_coco(path)
    assert ds.images.shape == (3, 3, 30, 40) and ds.images.dtype == torch.uint8
    assert ds.image_ids == [10, 11, 12] and ds.cat_ids == [3, 7] and ds.cat_names == ["three", "seven"]
    assert torch.equal(ds.boxes[0], torch.tensor([[2.0, 3.0, 12.0, 15.0], [20.0, 5.0, 28.0, 11.0]]))
    assert ds.labels[0].tolist() == [1, 0]  # id 7 -> index 1, id 3 -> index 0
    assert len(ds.boxes[1]) == 0 and len(ds.boxes[2]) == 0  # crowd and empty boxes are not training targets
    pixels = np.array(Image.open(tmp_path / "set" / "images" / "1.png"))
    assert torch.equal(ds.images[1], torch.from_numpy(pixels).permute(2, 0, 1))
    loader = detection.batches(path, batch_size=2)
    assert len(loader) == 2 and [len(t) for _, t in loader] == [2, 1]
    images, targets = next(iter(loader))
    m, s = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    assert torch.allclose(images, (ds.images[:2].float() / 255 - m) / s)
    assert [t["image_id"] for t in targets] == [10, 11] and targets[0]["scale"] == (1.0, 1.0)
    assert [len(t["boxes"]) for t in next(iter(detection.batches(path, batch_size=2, limit=1)))[1]] == [2]
    train = detection.batches(path, batch_size=3, train=True, seed=5)
    first, second = (torch.cat([x for x, _ in train]) for _ in range(2))
    again = torch.cat([x for x, _ in detection.batches(path, batch_size=3, train=True, seed=5)])
    assert torch.equal(first, again) and not torch.equal(first, second)  # reproducible, each pass differs


def test_coco_resize_and_errors(tmp_path):
    path = write_coco(tmp_path / "mixed", sizes=((40, 30), (20, 20), (40, 30)))
    with pytest.raises(ValueError, match="size="):
        load_coco(path)
    ds = load_coco(path, size=(60, 80))  # (h, w): everything scaled by 2
    assert ds.images.shape == (3, 3, 60, 80)
    assert torch.equal(ds.boxes[0][0], torch.tensor([4.0, 6.0, 24.0, 30.0])) and ds.scales[0] == (2.0, 2.0)
    bad = json.loads(path.read_text())
    bad["annotations"][0]["category_id"] = 99
    (tmp_path / "mixed" / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="category_id 99"):
        load_coco(tmp_path / "mixed" / "bad.json", size=32)


@pytest.mark.parametrize("seed", range(6))
def test_augmented_boxes_follow_the_pixels(seed):
    """Flip + scale + translate: each target box is the bounding box of its (bright, uniform) object."""
    h = w = 64
    img = torch.zeros(1, 3, h, w)
    boxes = torch.tensor([[8.0, 10.0, 30.0, 26.0], [36.0, 30.0, 60.0, 58.0]])
    for k, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
        img[0, k, y0:y1, x0:x1] = 1.0  # object k lives in channel k
    out, targets = augment(
        img, [{"boxes": boxes, "labels": torch.tensor([0, 1])}], torch.Generator().manual_seed(seed)
    )
    t = targets[0]
    for box, label in zip(t["boxes"], t["labels"]):
        ys, xs = (out[0, label] > 0.5).nonzero(as_tuple=True)
        seen = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        assert (box - seen).abs().max() <= 1.0, (seed, box, seen)
    for label in set(range(2)) - set(t["labels"].tolist()):  # a dropped box kept < 40 % of its area
        kept = (out[0, label] > 0.5).sum().item()
        assert (
            kept
            < 0.4 * float((boxes[label, 2] - boxes[label, 0]) * (boxes[label, 3] - boxes[label, 1])) + 2 * 64
        )


# ------------------------------------------------------------------------------------------ SSD semantics
def test_priors_follow_caffe_prior_box():
    p = PriorBoxParam(min_size=8, max_size=32, step=16, aspect_ratio=(2.0,))
    pri = level_priors(p, 1, 2, 32, 32) * 32  # one row, two cells; pixels
    r = math.sqrt(2)
    want = []
    for cx in (8.0, 24.0):  # (x + 0.5) * step
        for bw, bh in ((8, 8), (16, 16), (8 * r, 8 / r), (8 / r, 8 * r)):
            want.append([cx - bw / 2, 8 - bh / 2, cx + bw / 2, 8 + bh / 2])
    assert torch.allclose(pri, torch.tensor(want), atol=1e-4)
    assert p.num_priors == 4
    clipped = level_priors(PriorBoxParam(8, 32, 16, (2.0,), clip=True), 1, 2, 32, 32)
    assert clipped.min() == 0 and clipped.max() <= 1


def test_torchvision_ssd_default_boxes_are_caffe_priors():
    """torchvision's DefaultBoxGenerator (levels it does not clamp) = caffe PriorBox of ssd_meta_arch."""
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large
    from torchvision.models.detection.image_list import ImageList

    from xnnq.tasks.ssd import priors_and_variances
    from xnnq.tasks.tv_detection import torchvision_core

    model = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3).eval()
    with pytest.warns(UserWarning, match="clamps"):
        core, meta = torchvision_core(model, 128)
    x = torch.zeros(1, 3, 128, 128)
    with torch.no_grad():
        feats = list(core.backbone(x).values())
    tv = model.anchor_generator(ImageList(x, [(128, 128)]), feats)[0]
    ours, var = priors_and_variances(meta, [tuple(f.shape[-2:]) for f in feats])
    n = sum(
        f.shape[-1] * f.shape[-2] * p.num_priors for f, p in zip(feats[:3], meta.priors[:3])
    )  # unclamped levels
    assert torch.allclose(ours[:n] * 128, tv[:n], atol=1e-3)
    assert torch.equal(var[0], torch.tensor([0.1, 0.1, 0.2, 0.2])) and model.box_coder.weights == (
        10.0,
        10.0,
        5.0,
        5.0,
    )


def test_encode_decode():
    priors = torch.tensor([[0.1, 0.2, 0.3, 0.6]])
    var = torch.tensor([[0.1, 0.1, 0.2, 0.2]])
    # hand value: centre moves by 0.1 * 1 * w, w grows by exp(0.2 * 1)
    got = decode(torch.tensor([[1.0, 0.0, 1.0, 0.0]]), priors, var)
    w = 0.2 * math.exp(0.2)
    cx = 0.2 + 0.1 * 0.2
    assert torch.allclose(got, torch.tensor([[cx - w / 2, 0.2, cx + w / 2, 0.6]]))
    boxes = torch.tensor([[0.05, 0.3, 0.5, 0.55]])
    assert torch.allclose(decode(encode(boxes, priors, var), priors, var), boxes, atol=1e-6)


def test_match_keeps_the_best_prior_of_every_box():
    priors = torch.tensor([[0, 0, 10, 10], [0, 0, 12, 12], [20, 20, 30, 30]], dtype=torch.float32)
    gt = torch.tensor([[0, 0, 11, 11], [25, 25, 37, 37]], dtype=torch.float32)
    idx = match(gt, priors, threshold=0.5)
    assert idx.tolist() == [0, 0, 1]  # box 1 has no prior over 0.5 but keeps its best one (prior 2, IoU 0.11)
    far = torch.tensor([[60, 60, 70, 70]], dtype=torch.float32)
    assert match(far, priors).tolist() == [-1, -1, -1]  # overlapping nothing: no forced match


def one_level_meta(**kw) -> SSDMetaArch:
    """32x32 image, a 2x2 map (step 16), one 16x16 prior per cell; 3 classes (background 0)."""
    return SSDMetaArch(
        in_width=32,
        in_height=32,
        num_classes=3,
        priors=(PriorBoxParam(16, None, 16, aspect_ratio=()),),
        box_outputs=(0,),
        class_outputs=(1,),
        **kw,
    )


def test_postprocess_on_hand_made_outputs():
    meta = one_level_meta(nms_threshold=0.5, confidence_threshold=0.3)
    loc = torch.zeros(1, 4, 2, 2)
    loc[0, 0, 0, 1] = (8 - 24) / 16 / 0.1  # cell (0, 1) moved onto cell (0, 0): the same box
    conf = torch.tensor([10.0, -10.0, -10.0]).view(1, 3, 1, 1).repeat(1, 1, 2, 2)  # background everywhere
    conf[0, :, 0, 0] = torch.tensor([0.0, 3.0, -10.0])  # class 1 (label 0), p = 0.95
    conf[0, :, 0, 1] = torch.tensor([0.0, 2.0, -1.0])  # class 1 p = 0.84 (suppressed), class 2 0.04 (< 0.3)
    conf[0, :, 1, 1] = torch.tensor([0.0, -10.0, 1.0])  # class 2 (label 1), p = 0.73
    (r,) = detection.postprocess(meta, (loc, conf))
    p = torch.softmax(torch.tensor([0.0, 3.0, -10.0]), 0)[1]
    q = torch.softmax(torch.tensor([0.0, -10.0, 1.0]), 0)[2]
    assert r["labels"].tolist() == [0, 1]
    assert torch.allclose(r["scores"], torch.stack([p, q]))
    assert torch.allclose(
        r["boxes"], torch.tensor([[0.0, 0.0, 16.0, 16.0], [16.0, 16.0, 32.0, 32.0]]), atol=1e-5
    )
    (r2,) = detection.postprocess(
        meta, (loc, conf), nms_threshold=1.0
    )  # no suppression: the moved box is back
    assert sorted(r2["scores"].tolist(), reverse=True)[1] == pytest.approx(
        torch.softmax(conf[0, :, 0, 1], 0)[1].item()
    )
    (r3,) = detection.postprocess(meta, (loc, conf), keep_top_k=1)
    assert r3["labels"].tolist() == [0]


def test_multibox_loss_is_low_for_the_right_answer():
    meta = one_level_meta()
    target = [{"boxes": torch.tensor([[0.0, 0.0, 16.0, 16.0]]), "labels": torch.tensor([1])}]
    loc = torch.zeros(1, 4, 2, 2, requires_grad=True)
    good = torch.full((1, 3, 2, 2), 0.0)
    good[0, 0] = 8.0
    good[0, :, 0, 0] = torch.tensor([0.0, 0.0, 8.0])
    bad = good.clone()
    bad[0, :, 0, 0] = torch.tensor([8.0, 0.0, 0.0])
    low, _ = multibox_loss(meta, (loc, good), target)
    high, _ = multibox_loss(meta, (loc, bad), target)
    assert low < 0.01 < high


# ------------------------------------------------------------------------------------------ export + prototxt
class TinySSD(nn.Module):
    """Two levels (strides 8 and 16) of a 32x32 input, an FPN add with nearest x2 resize, SSD heads."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Sequential(
            nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, 4, 1), nn.ReLU()
        )
        self.c2 = nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU())
        self.box = nn.ModuleList([nn.Conv2d(8, 8, 3, 1, 1), nn.Conv2d(8, 8, 3, 1, 1)])
        self.cls = nn.ModuleList([nn.Conv2d(8, 6, 3, 1, 1), nn.Conv2d(8, 6, 3, 1, 1)])
        self.meta_arch = SSDMetaArch(
            in_width=32,
            in_height=32,
            num_classes=3,
            priors=(PriorBoxParam(8, 16, 8, ()), PriorBoxParam(16, 32, 16, ())),
            box_outputs=(0, 2),
            class_outputs=(1, 3),
        )

    def forward(self, x):
        a = self.c1(x)
        b = self.c2(a)
        a = a + nn.functional.interpolate(b, scale_factor=2.0, mode="nearest")
        return self.box[0](a), self.cls[0](a), self.box[1](b), self.cls[1](b)


def calibrated(model, shape=(1, 3, 32, 32)):
    q = xnnq.QuantCalibrateModule(model, torch.zeros(shape))
    q.train()
    with torch.no_grad():
        for _ in range(3):
            q(torch.randn(4, *shape[1:]))
    return q.eval()


@pytest.mark.parametrize("fmt", ["tidl", "qdq"])
def test_export_writes_prototxt_with_graph_names(tmp_path, fmt):
    model = TinySSD().eval()
    q = calibrated(model)
    path = detection.export(q, tmp_path / f"tiny_{fmt}.onnx", format=fmt, meta_arch=model.meta_arch)
    graph = onnx.load(str(path)).graph
    outputs = [o.name for o in graph.output]
    tree = parse_prototxt(path.with_suffix(".prototxt").read_text())
    ssd = tree["caffe_ssd"][0]
    assert ssd["box_input"] == [outputs[0], outputs[2]] and ssd["class_input"] == [outputs[1], outputs[3]]
    for name in ssd["box_input"] + ssd["class_input"]:
        assert head_conv(graph, name).op_type == "Conv"
    assert [p["min_size"][0] for p in ssd["prior_box_param"]] == [8.0, 16.0]
    assert ssd["detection_output_param"][0]["code_type"] == ["CENTER_SIZE"]
    assert read_prototxt(path.with_suffix(".prototxt")) == model.meta_arch  # parsed back: the same meta-arch
    opts = read_options(path)
    ro = opts["runtime_options"]
    assert ro["object_detection:meta_arch_type"] == 3
    assert (path.parent / ro["object_detection:meta_layers_names_list"]).is_file()
    assert opts["model_type"] == "od" and opts["od_type"] == "SSD"
    assert (fmt == "qdq") == (ro.get("advanced_options:prequantized_model") == 1)


def test_prototxt_parser():
    text = '# comment\nname: "x"\nblock {\n  a: 1\n  a: 2.5\n  e: CENTER_SIZE\n  s: "q\\"t"\n  inner { b: true }\n}\n'
    assert parse_prototxt(text) == {
        "name": ["x"],
        "block": [{"a": [1, 2.5], "e": ["CENTER_SIZE"], "s": ['q"t'], "inner": [{"b": [True]}]}],
    }
    with pytest.raises(ValueError, match="missing"):
        parse_prototxt("a {\n b: 1\n")
    meta = TinySSD().meta_arch
    back = parse_prototxt(prototxt_text(meta, ["b0", "b1"], ["c0", "c1"]))
    assert back["caffe_ssd"][0]["output"] == ["boxes", "labels", "scores"]


class Flattened(TinySSD):
    def forward(self, x):
        outs = super().forward(x)
        return (outs[0].flatten(1),) + outs[1:]


def test_export_refuses_heads_that_are_not_convs(tmp_path):
    model = Flattened().eval()
    q = calibrated(model)
    with pytest.raises(ValueError, match="not from a Conv"):
        detection.export(q, tmp_path / "flat.onnx", meta_arch=model.meta_arch)


def test_meta_arch_is_required_for_a_wrapper(tmp_path):
    q = calibrated(TinySSD().eval())
    with pytest.raises(ValueError, match="meta_arch=float_model.meta_arch"):
        detection.export(q, tmp_path / "x.onnx")


# ------------------------------------------------------------------------------------------ evaluate
VAL = data_root() / "mosaic10" / "val" / "instances.json"
needs_mosaic = pytest.mark.skipif(
    not VAL.is_file(), reason=f"Mosaic-10 val set not found at {VAL} (set XNNQ_DATA)"
)


@needs_mosaic
def test_evaluate_float_wrapper_and_onnx_agree(tmp_path):
    """Identical numerics give identical mAP: float == wrapper with quantization off; wrapper rounding as
    onnxruntime does == QDQ ONNX == TIDL-emulated ``tidl`` ONNX."""
    from xnnq.layers.freeze import set_quant_enabled
    from xnnq.models.zoo import load_pretrained

    torch.set_num_threads(1)
    model = load_pretrained("mosaic_detector")
    kw = {"limit": 16, "batch_size": 8, "progress": False}
    ref = detection.evaluate(model, VAL, **kw)
    assert ref["mAP50"] > 20  # a trained detector on these images, not an empty result
    off = xnnq.QuantTestModule(model, torch.zeros(1, 3, 128, 128))
    set_quant_enabled(off, False)
    assert detection.evaluate(off, VAL, meta_arch=model.meta_arch, **kw) == ref
    q = xnnq.QuantCalibrateModule(model, torch.zeros(1, 3, 128, 128))
    q.train()
    with torch.no_grad():
        for images, _ in detection.batches(VAL, batch_size=8, limit=16):
            q(images)
    q.eval()
    xnnq.layers.set_rounding(q, "half_even")  # onnxruntime's rounding: the same numerics as the ONNX runs
    sim = detection.evaluate(q, VAL, meta_arch=model.meta_arch, **kw)
    for fmt in ("qdq", "tidl"):
        path = detection.export(q, tmp_path / f"det_{fmt}.onnx", format=fmt, meta_arch=model.meta_arch)
        assert detection.evaluate(path, VAL, **kw) == sim, fmt
