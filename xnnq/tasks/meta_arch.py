"""TIDL object-detection meta-architecture files and the OD compile options of an export.

TIDL offloads a detector's post-processing (box decoding, score conversion, NMS) when the compile
options name a meta-architecture file (``object_detection:meta_layers_names_list``) and its type
(``object_detection:meta_arch_type``) [edgeai-tidl-tools docs/tidl_fsg_od_meta_arch.md and
examples/osrt_python/README.md, "Object Detection model specific options"]. The file is protobuf text:

* ``caffe_ssd`` (type 3, "ONNX SSD"): ``box_input`` / ``class_input`` per head, ``output``, ``in_width``,
  ``in_height``, one ``prior_box_param`` per head and ``detection_output_param`` — the fields of the
  original caffe-SSD ``PriorBoxParameter`` / ``DetectionOutputParameter`` [tidl_fsg_od_meta_arch.md,
  section "ONNX SSD"; examples/models/prototxt/mmdet/ssd_*.prototxt];
* ``tidl_retinanet`` (type 5): ``box_input`` / ``class_input``, ``x_scale`` ... ``height_scale``,
  ``score_converter``, ``anchor_param`` (``aspect_ratio``, ``octave_base_scale``, ``scales_per_octave``)
  and ``detection_output_param`` [examples/models/prototxt/mmdet/retinanet_*.prototxt; the docs give no
  field-by-field description of this message].

The head tensor names are read from the exported ONNX graph: the graph output at each head's position
in the core's output tuple, checked to come from a ``Conv`` through only the quantizer ops (``Clip``,
``QuantizeLinear``, ``DequantizeLinear``) — the name TIDL gives a conv layer whose quantizer follows it,
as in the 16-bit name lists of :func:`xnnq.export_onnx`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch

from .ssd import PriorBoxParam, SSDMetaArch

META_ARCH_TYPE_OPTION = "object_detection:meta_arch_type"
META_LAYERS_OPTION = "object_detection:meta_layers_names_list"
QUANTIZER_OPS = {"Clip", "QuantizeLinear", "DequantizeLinear"}


@dataclass(frozen=True)
class RetinaNetMetaArch:
    """A RetinaNet-style head for TIDL's ``tidl_retinanet`` (``meta_arch_type`` 5): sigmoid class scores,
    anchors ``octave_base_scale * stride * 2^(i / scales_per_octave)`` x ``aspect_ratio``, box coder weights."""

    in_width: int
    in_height: int
    num_classes: int
    box_outputs: tuple[int, ...]
    class_outputs: tuple[int, ...]
    aspect_ratio: tuple[float, ...] = (0.5, 1.0, 2.0)
    octave_base_scale: float = 4.0
    scales_per_octave: int = 3
    box_coder_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    background_label_id: int = -1
    nms_threshold: float = 0.5
    top_k: int = 1000
    keep_top_k: int = 300
    confidence_threshold: float = 0.05
    code_type: str = "CENTER_SIZE"
    meta_arch_type: int = 5
    extra: dict = field(default_factory=dict, compare=False)


# ------------------------------------------------------------------------------------------ writing
def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return v if re.fullmatch(r"[A-Z][A-Z0-9_]*", v) else '"' + v.replace('"', '\\"') + '"'
    if isinstance(v, float):
        return repr(float(v))
    return str(v)


def _block(name: str, items: list[tuple[str, Any]], indent: int = 0) -> list[str]:
    pad = "  " * indent
    lines = [f"{pad}{name} {{"]
    for k, v in items:
        if isinstance(v, list) and v and isinstance(v[0], tuple):
            lines += _block(k, v, indent + 1)
        else:
            lines.append(f"{pad}  {k}: {_fmt(v)}")
    lines.append(f"{pad}}}")
    return lines


def _detection_output(meta, num_classes: int) -> list[tuple[str, Any]]:
    return [
        ("num_classes", num_classes),
        ("share_location", True),
        ("background_label_id", meta.background_label_id),
        ("nms_param", [("nms_threshold", float(meta.nms_threshold)), ("top_k", meta.top_k)]),
        ("code_type", meta.code_type),
        ("keep_top_k", meta.keep_top_k),
        ("confidence_threshold", float(meta.confidence_threshold)),
    ]


def prototxt_text(
    meta: SSDMetaArch | RetinaNetMetaArch,
    box_names: list[str],
    class_names: list[str],
    outputs: tuple[str, ...] = ("boxes", "labels", "scores"),
    name: str | None = None,
) -> str:
    """The meta-architecture file of ``meta`` with the given head tensor names."""
    items: list[tuple[str, Any]] = [("box_input", n) for n in box_names] + [
        ("class_input", n) for n in class_names
    ]
    items += [("output", o) for o in outputs] + [("in_width", meta.in_width), ("in_height", meta.in_height)]
    if isinstance(meta, SSDMetaArch):
        block, name = "caffe_ssd", name or "ssd"
        for p in meta.priors:
            prior: list[tuple[str, Any]] = [("min_size", float(p.min_size))]
            if p.max_size is not None:
                prior.append(("max_size", float(p.max_size)))
            prior += [("aspect_ratio", float(r)) for r in p.aspect_ratio]
            prior += [("flip", p.flip), ("clip", p.clip)] + [("variance", float(v)) for v in p.variance]
            prior.append(("step", float(p.step)))
            if p.offset != 0.5:  # caffe's default; the TI examples never write it
                prior.append(("offset", float(p.offset)))
            items.append(("prior_box_param", prior))
        items.append(("detection_output_param", _detection_output(meta, meta.num_classes)))
    elif isinstance(meta, RetinaNetMetaArch):
        block, name = "tidl_retinanet", name or "retinanet"
        wx, wy, ww, wh = meta.box_coder_weights
        items += [
            ("x_scale", float(wx)),
            ("y_scale", float(wy)),
            ("width_scale", float(ww)),
            ("height_scale", float(wh)),
            ("score_converter", "SIGMOID"),
            (
                "anchor_param",
                [("aspect_ratio", float(r)) for r in meta.aspect_ratio]
                + [
                    ("octave_base_scale", float(meta.octave_base_scale)),
                    ("scales_per_octave", meta.scales_per_octave),
                ],
            ),
            ("detection_output_param", _detection_output(meta, meta.num_classes)),
        ]
    else:
        raise TypeError(f"no TIDL meta-architecture writer for {type(meta).__name__}")
    return "\n".join([f"name: {_fmt(name)}"] + _block(block, items)) + "\n"


# ------------------------------------------------------------------------------------------ parsing
_TOKEN = re.compile(
    r'\s*(?:(#[^\n]*)|([A-Za-z_][A-Za-z0-9_]*)\s*:\s*("(?:[^"\\]|\\.)*"|[^\s{}]+)|'
    r"([A-Za-z_][A-Za-z0-9_]*)\s*\{|(\}))"
)


def parse_prototxt(text: str) -> dict[str, list]:
    """Protobuf text -> nested ``{field: [values...]}`` (every field a list; sub-messages are dicts)."""
    root: dict[str, list] = {}
    stack = [root]
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ValueError(f"prototxt: cannot parse at character {pos}: {text[pos : pos + 40]!r}")
        pos = m.end()
        comment, key, value, block, close = m.groups()
        if comment:
            continue
        if key:
            if value.startswith('"'):
                v: Any = value[1:-1].replace('\\"', '"')
            elif value in ("true", "false"):
                v = value == "true"
            else:
                try:
                    v = int(value)
                except ValueError:
                    try:
                        v = float(value)
                    except ValueError:
                        v = value  # enum
            stack[-1].setdefault(key, []).append(v)
        elif block:
            child: dict[str, list] = {}
            stack[-1].setdefault(block, []).append(child)
            stack.append(child)
        elif close:
            if len(stack) == 1:
                raise ValueError("prototxt: unbalanced '}'")
            stack.pop()
    if len(stack) != 1:
        raise ValueError("prototxt: missing '}'")
    return root


def read_prototxt(path: str | Path, output_names: list[str] | None = None) -> SSDMetaArch | RetinaNetMetaArch:
    """The meta-architecture in a prototxt (``caffe_ssd`` or ``tidl_retinanet``).

    Head indices are the positions of the ``box_input`` / ``class_input`` names in ``output_names`` (the
    ONNX graph's outputs; by default the ONNX file beside the prototxt is read for them).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"meta-architecture file {path} not found (xnnq.tasks.detection.export writes it "
            "beside the .onnx)"
        )
    tree = parse_prototxt(path.read_text())
    if output_names is None:
        onnx_path = path.with_suffix(".onnx")
        output_names = [o.name for o in onnx.load(str(onnx_path), load_external_data=False).graph.output]

    def index(names: list[str], what: str) -> tuple[int, ...]:
        missing = [n for n in names if n not in output_names]
        if missing:
            raise ValueError(f"{path}: {what} {missing} are not outputs of the graph ({output_names})")
        return tuple(output_names.index(n) for n in names)

    def one(d: dict, k: str, default: Any = None) -> Any:
        return d[k][0] if k in d else default

    if "caffe_ssd" in tree:
        s = tree["caffe_ssd"][0]
        det = s["detection_output_param"][0]
        nms = det["nms_param"][0]
        priors = tuple(
            PriorBoxParam(
                float(p["min_size"][0]),
                float(p["max_size"][0]) if "max_size" in p else None,
                float(p["step"][0]),
                tuple(float(r) for r in p.get("aspect_ratio", [])),
                bool(one(p, "flip", True)),
                bool(one(p, "clip", False)),
                tuple(float(v) for v in p.get("variance", [0.1, 0.1, 0.2, 0.2])),
                float(one(p, "offset", 0.5)),
            )
            for p in s["prior_box_param"]
        )
        return SSDMetaArch(
            in_width=int(s["in_width"][0]),
            in_height=int(s["in_height"][0]),
            num_classes=int(det["num_classes"][0]),
            priors=priors,
            box_outputs=index(s["box_input"], "box_input"),
            class_outputs=index(s["class_input"], "class_input"),
            background_label_id=int(one(det, "background_label_id", 0)),
            nms_threshold=float(nms["nms_threshold"][0]),
            top_k=int(one(nms, "top_k", 200)),
            keep_top_k=int(one(det, "keep_top_k", 200)),
            confidence_threshold=float(one(det, "confidence_threshold", 0.01)),
            code_type=str(one(det, "code_type", "CENTER_SIZE")),
        )
    if "tidl_retinanet" in tree:
        s = tree["tidl_retinanet"][0]
        det = s["detection_output_param"][0]
        nms = det["nms_param"][0]
        a = s["anchor_param"][0]
        return RetinaNetMetaArch(
            in_width=int(s["in_width"][0]),
            in_height=int(s["in_height"][0]),
            num_classes=int(det["num_classes"][0]),
            box_outputs=index(s["box_input"], "box_input"),
            class_outputs=index(s["class_input"], "class_input"),
            aspect_ratio=tuple(float(r) for r in a["aspect_ratio"]),
            octave_base_scale=float(a["octave_base_scale"][0]),
            scales_per_octave=int(a["scales_per_octave"][0]),
            box_coder_weights=tuple(
                float(s[k][0]) for k in ("x_scale", "y_scale", "width_scale", "height_scale")
            ),
            background_label_id=int(one(det, "background_label_id", -1)),
            nms_threshold=float(nms["nms_threshold"][0]),
            top_k=int(one(nms, "top_k", 200)),
            keep_top_k=int(one(det, "keep_top_k", 200)),
            confidence_threshold=float(one(det, "confidence_threshold", 0.05)),
        )
    raise ValueError(f"{path}: no caffe_ssd or tidl_retinanet block (found {sorted(tree)})")


# ------------------------------------------------------------------------------------------ export
def head_conv(graph: onnx.GraphProto, tensor: str) -> onnx.NodeProto:
    """The ``Conv`` that produces graph tensor ``tensor`` through quantizer ops only (error otherwise)."""
    prod = {o: n for n in graph.node for o in n.output}
    t = tensor
    for _ in range(8):
        node = prod.get(t)
        if node is None:
            break
        if node.op_type == "Conv":
            return node
        if node.op_type not in QUANTIZER_OPS:
            raise ValueError(
                f"head output {tensor!r} comes from a {node.op_type} node ({node.name}), not from a Conv: "
                "TIDL's meta-architecture takes the head conv outputs; end the traceable core at the "
                "head convs (reshape/permute/decoding belong to the post-processing)"
            )
        t = node.input[0]
    raise ValueError(f"head output {tensor!r}: no producing Conv found in the graph")


def head_names(model: onnx.ModelProto, meta: SSDMetaArch | RetinaNetMetaArch) -> tuple[list[str], list[str]]:
    """``(box names, class names)``: the graph outputs at the meta-architecture's head positions, each
    checked to be a conv output (see :func:`head_conv`)."""
    outs = [o.name for o in model.graph.output]
    need = max(meta.box_outputs + meta.class_outputs)
    if need >= len(outs):
        raise ValueError(
            f"the meta-architecture names output {need} but the graph has {len(outs)} outputs {outs}"
        )
    box = [outs[i] for i in meta.box_outputs]
    cls = [outs[i] for i in meta.class_outputs]
    for n in box + cls:
        head_conv(model.graph, n)
    return box, cls


def export_detector(
    qmodel: Any,
    path: str | Path,
    *,
    format: str = "tidl",
    meta_arch: SSDMetaArch | RetinaNetMetaArch,
    dummy_input: torch.Tensor | None = None,
    outputs: tuple[str, ...] = ("boxes", "labels", "scores"),
    **export_kwargs,
) -> Path:
    """``xnnq.export_onnx`` + the meta-architecture prototxt (``<stem>.prototxt``) + the OD options.

    The options JSON gains ``object_detection:meta_arch_type`` and ``object_detection:meta_layers_names_list``
    (the prototxt's file name, beside the ONNX) in ``runtime_options``, and ``model_type: "od"`` /
    ``od_type`` as in edgeai-tidl-tools' example model configs. ``outputs`` are the names the prototxt
    gives TIDL's detection outputs (the TI docs name the boxes, labels and scores outputs; a graph that
    ends at the head convs has none of its own).
    """
    from ..export import export_onnx
    from ..export.options import read_options, write_options

    path = Path(path)
    if dummy_input is None:
        dummy_input = torch.zeros(1, 3, meta_arch.in_height, meta_arch.in_width)
    result = export_onnx(qmodel, dummy_input, path, format=format, **export_kwargs)
    box, cls = head_names(result.model, meta_arch)
    proto = path.with_suffix(".prototxt")
    proto.write_text(prototxt_text(meta_arch, box, cls, outputs))
    opts = read_options(path)
    opts["runtime_options"][META_ARCH_TYPE_OPTION] = meta_arch.meta_arch_type
    opts["runtime_options"][META_LAYERS_OPTION] = proto.name
    opts["model_type"] = "od"
    opts["od_type"] = "SSD" if isinstance(meta_arch, SSDMetaArch) else "RetinaNet"
    opts["meta_arch_file"] = proto.name
    write_options(path, opts)
    return result.path
