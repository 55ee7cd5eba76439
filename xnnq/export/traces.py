"""Layer traces in the layout of TIDL's debug traces, and a comparison of two trace folders.

TIDL writes one fixed-point trace per layer output when inference runs with ``debug_level`` 3 (and a
``_float.bin`` twin with ``debug_level`` 4), named by the output buffer's *dataId* and its dimensions
(edgeai-tidl-tools docs/tidl_osr_debug.md, "Steps to Debug Error Scenarios for target(EVM/device)
execution" and "Feature Map Comparison with Reference"; the field order is the one
scripts/tidl_debug_scripts/stitch_multicore_traces.py parses and writes)::

    tidl_trace_subgraph_0_<dataId:04d>_<batch:04d>_<dim1:04d>_<dim2:05d>_<channels:05d>_<width:05d>x<height:05d>.y
    tidl_trace_subgraph_0_<...same...>_float.bin

``.y`` holds the raw integer codes (int8/uint8/int16/uint16, C order, all batches), ``_float.bin`` the
dequantized float32 values. The mapping ``layerId dataId name`` is in ``layer_info.txt`` (TIDL: the
``*.layer_info.txt`` of the compiled artifacts' tempDir; layer_trace_inspector.py keeps the lines whose
first two columns are equal and reads the name from the last). Here every ``QuantizeLinear`` is one
layer, numbered in topological order, named by its quantized tensor (the ``DequantizeLinear`` output);
``xnnq_traces.json`` records the code type and scale of each file.

TIDL numbers its own layers (it fuses Conv+ReLU, drops Q/DQ pairs): match a board's folder to this one
by name through both ``layer_info.txt`` files (:func:`compare_traces`), not by dataId.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

PREFIX = "tidl_trace_subgraph_0"
INFO = "layer_info.txt"
META = "xnnq_traces.json"
_NAME = re.compile(r"_(\d{4})_(\d{4,5})_(\d{4,5})_(\d{4,5})_(\d{5})_(\d{5})x(\d{5})(_float\.bin|\.y)$")


def tidl_dims(shape: tuple[int, ...]) -> tuple[int, int, int, int, int, int]:
    """``(batch, dim1, dim2, channels, height, width)`` of a tensor (right-aligned on N,C,H,W; a 2-D
    ``(N, K)`` output is ``K`` wide, as TIDL's inner-product output)."""
    s = list(shape) if shape else [1]
    n = s[0]
    rest = s[1:]
    hw_c = ([1] * (3 - len(rest)) + rest)[-3:] if len(rest) <= 3 else [int(np.prod(rest[:-2]))] + rest[-2:]
    c, h, w = hw_c
    return n, 1, 1, int(c), int(h), int(w)


def trace_stem(data_id: int, shape: tuple[int, ...]) -> str:
    n, d1, d2, c, h, w = tidl_dims(shape)
    return f"{PREFIX}_{data_id:04d}_{n:04d}_{d1:04d}_{d2:05d}_{c:05d}_{w:05d}x{h:05d}"


def write_traces(folder: str | Path, points, codes: dict[str, np.ndarray]) -> Path:
    """Write one ``.y`` + ``_float.bin`` per quantized tensor in ``codes`` (by QuantizeLinear output
    name), ``layer_info.txt`` and ``xnnq_traces.json``; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta: dict[str, dict] = {}
    lines = []
    data_id = 0
    for p in points:
        if p.codes not in codes:
            continue
        arr = np.ascontiguousarray(codes[p.codes].astype(p.dtype))
        stem = trace_stem(data_id, arr.shape)
        arr.tofile(folder / f"{stem}.y")
        (arr.astype(np.float64) * p.scale).astype(np.float32).tofile(folder / f"{stem}_float.bin")
        lines.append(f"{data_id} {data_id} {p.tensor}")
        meta[p.tensor] = {
            "data_id": data_id,
            "file": f"{stem}.y",
            "dtype": np.dtype(p.dtype).name,
            "scale": p.scale,
            "shape": list(arr.shape),
            "quantize_node": p.node,
        }
        data_id += 1
    (folder / INFO).write_text("\n".join(lines) + "\n")
    (folder / META).write_text(json.dumps(meta, indent=1) + "\n")
    return folder


@dataclass
class TraceFile:
    data_id: int
    path: Path
    dims: tuple[int, ...]  # batch, dim1, dim2, channels, width, height as in the name


@dataclass
class TraceDiff:
    """One layer present in both folders."""

    name: str
    data_id_a: int
    data_id_b: int
    elements: int
    mismatches: int  # elements that differ (-1: sizes differ)
    max_abs_diff: float  # in codes (LSB) for .y traces

    def to_dict(self) -> dict:
        return asdict(self)


def read_folder(folder: str | Path, kind: str = ".y") -> dict[int, TraceFile]:
    """The trace files of ``kind`` (``".y"`` or ``"_float.bin"``) in ``folder`` by dataId (any prefix,
    TIDL's own included)."""
    out = {}
    for f in sorted(Path(folder).iterdir()):
        m = _NAME.search(f.name)
        if m and m.group(8) == kind:
            dims = tuple(int(g) for g in m.groups()[1:7])
            out[int(m.group(1))] = TraceFile(int(m.group(1)), f, dims)
    return out


def read_layer_info(path: str | Path) -> dict[str, int]:
    """``{name: dataId}`` from a ``layer_info.txt`` (``layerId dataId ... name`` per line)."""
    names = {}
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3:
            names[parts[-1]] = int(parts[1])
    return names


def _dtype_for(folder: Path, data_id: int, tf: TraceFile) -> np.dtype:
    meta_path = folder / META
    if meta_path.is_file():
        for m in json.loads(meta_path.read_text()).values():
            if m["data_id"] == data_id:
                return np.dtype(m["dtype"])
    count = int(np.prod(tf.dims))
    size = tf.path.stat().st_size
    return np.dtype(np.int16) if count and size == 2 * count else np.dtype(np.int8)


def compare_traces(
    a: str | Path, b: str | Path, *, info_a: str | Path | None = None, info_b: str | Path | None = None
) -> list[TraceDiff]:
    """Compare the ``.y`` traces of two folders layer by layer, in the order of folder ``a``.

    Layers are matched by name through each folder's ``layer_info.txt`` (or ``info_a``/``info_b``, e.g.
    TIDL's ``<artifacts>/tempDir/*.layer_info.txt``), else by dataId. Values are read with the code type
    recorded in ``xnnq_traces.json`` (else int8, or int16 when the file holds 2 bytes per element).
    The first entry with ``mismatches != 0`` is the first layer where the two runs part.
    """
    a, b = Path(a), Path(b)
    fa, fb = read_folder(a), read_folder(b)
    ia = read_layer_info(info_a or a / INFO) if (info_a or (a / INFO).is_file()) else {}
    ib = read_layer_info(info_b or b / INFO) if (info_b or (b / INFO).is_file()) else {}
    pairs: list[tuple[str, int, int]] = []
    if ia and ib and set(ia) & set(ib):
        pairs = [(name, ia[name], ib[name]) for name in sorted(ia, key=ia.get) if name in ib]
    else:
        names = {v: k for k, v in ia.items()}
        pairs = [(names.get(d, str(d)), d, d) for d in sorted(fa) if d in fb]
    out = []
    for name, da, db in pairs:
        if da not in fa or db not in fb:
            continue
        ta, tb = fa[da], fb[db]
        xa = np.fromfile(ta.path, dtype=_dtype_for(a, da, ta))
        xb = np.fromfile(tb.path, dtype=_dtype_for(b, db, tb))
        if xa.size != xb.size:
            out.append(TraceDiff(name, da, db, int(xa.size), -1, float("nan")))
            continue
        d = np.abs(xa.astype(np.int64) - xb.astype(np.int64))
        out.append(
            TraceDiff(name, da, db, int(xa.size), int((d != 0).sum()), float(d.max()) if d.size else 0.0)
        )
    return out


def first_mismatch(diffs: list[TraceDiff]) -> TraceDiff | None:
    """The first layer of :func:`compare_traces` whose traces differ, or None when all agree."""
    return next((d for d in diffs if d.mismatches != 0), None)
