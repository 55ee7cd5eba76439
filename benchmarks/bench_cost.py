"""Cost of quantization at real resolution (issue 16): train step, peak memory and calibration, per model.

    python benchmarks/bench_cost.py [--threads 2] [--models resnet20 mobilenet_v2 ...] [--repeats 3] [--record]

Models: ResNet-20 (32x32, batch 128; the CIFAR-10 weights and images when $XNNQ_DATA has them, else random),
torchvision ``mobilenet_v2``, ``resnet18``, ``efficientnet_b0`` (224x224, batch 16, ``weights=None``), and the
Mosaic detector (128x128, batch 16) when ``xnnq.models.zoo`` registers ``"mosaic_detector"``.

Per model, in one process:

* **Train step** (SGD with momentum, model in training mode, BatchNorm updating): the float model, the
  same model in ``QuantTrainModule`` and in torch.ao ``prepare_qat_fx`` (``get_default_qat_qconfig_mapping
  ("x86")``, the peer). After two warm-up steps each, ``--steps`` rounds run one step of every variant in
  turn (the order rotates each round, so slow drifts of a shared machine hit all variants alike); the
  medians of wall time (``*_ms``) and of process CPU time (``*_cpu_ms``, all threads) are reported.
* **Peak memory of a step**: one more step of each variant under ``torch.profiler`` with
  ``profile_memory=True``. Every CPU allocation and free made by torch during that step is reported by its
  allocator with its size; the running sum over the step, in time order, is the memory the step holds
  above what existed before it (activations saved for backward, masks, temporaries, gradients and optimizer
  work), and its maximum is the step's peak (``*_peak_mb``). Gradients are released (``zero_grad(set_to_none=
  True)``) before the profiled step starts, so both variants start from the same state; the parameters and
  optimizer state that persist across steps are not counted. This is exact and independent of the
  process's RSS (which the C allocator does not return promptly). On CUDA ``torch.cuda.max_memory_allocated``
  above the step's starting level is used instead.
* **Ops off the CPU** (``*_ops_off_cpu``): the ATen ops (views left out) that one forward and backward of
  each variant dispatches on the ``meta`` device, the path a CUDA step takes (xnnq's C kernels serve CPU
  tensors only): on a GPU each is about one kernel launch, and a launch costs microseconds of host time
  whatever the tensor's size. A count, not a time: there is no GPU here.
* **Calibration**: ``QuantCalibrateModule`` in calibration mode vs the float model in eval mode, both under
  ``torch.no_grad``, over the same ``--calib-images`` images (1000 for ResNet-20, 256 for the 128×128
  detector, 128 at 224×224), interleaved batch by batch, ``--calib-passes`` passes (5); ``calib_over_float``
  is the ratio of the median pass times (wall), ``calib_over_float_cpu`` of process CPU time, and
  ``calib_pass_ratios`` each pass's ratio, ``*_minor_faults`` the median page faults of a pass (first touches
  of freshly mapped memory: on this machine they set most of the difference between processes). Until 2026-12-04 the 224×224 models used 64 images and three
  passes: EfficientNet-B0's ratio then moved between 0.85 and 1.16 from one run to the next. ``finalize()``
  (range choice, bias correction) is timed once, apart.

**Allocator** (``--malloc``): ``default`` leaves glibc as it is: a block over its mmap threshold (at most
32 MB; a 224×224 activation at batch 16 is 13–80 MB) is mapped fresh for every allocation and returned at
every free, so each large activation, gradient and temporary pays page faults on first touch (in both
variants; a quarter of a float step here). ``keep`` (``mallopt``: mmap and trim thresholds 1 GiB) serves
them from a heap that is kept between steps, as CUDA's caching allocator does where users train: the ratios
then compare the work of the two steps rather than the kernel's page-fault handling. The mode is in each
JSON line.

**Process per measurement**: each model's steps, and then its calibration, are measured in a child process of
their own (``--same-process``: everything in this one), so that the numbers do not depend on the heap that
earlier measurements leave behind. Calibration is a job of its own for a user (load a model, calibrate,
export); measured after the QAT steps in one process (as up to 2026-12-03) its ratio was higher and more
variable (2 threads, medians of three: the detector 1.16, EfficientNet-B0 1.12; the same code measured alone:
1.02 and 1.03), the float forward interleaved with it notwithstanding.

**Several processes** (``--repeats``, 3): on this machine the same code measured in separate processes gave
ratios up to 0.15 apart, while the timings inside one process agree with each other (2026-12-04, full runs
in docs/README_cost.md). A process fixes state that no repetition inside it samples again (where its heap
and thread pool land in memory and on the cores, the machine's other load over its minutes), so each
measurement is made in ``--repeats`` processes (steps and calibration alternating) and every number in the
row is the median over them; each process's own ratios are under ``per_process`` (the table shows their
range). pyperf spawns worker processes for the same reason.

The machine's load (``os.getloadavg()``) is reported before and after each model. One JSON line per model
on stdout; ``--record`` also appends them to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import xnnq
from xnnq import data
from xnnq.calibrate import QuantCalibrateModule

from common import RESULTS, machine

GOAL_STEP, GOAL_CALIB, GOAL_MEM = 1.30, 1.10, 1.30
MODELS = ("resnet20", "mobilenet_v2", "resnet18", "efficientnet_b0", "mosaic_detector")


# ------------------------------------------------------------------------------------------- models
def _model_spec(name: str) -> dict[str, Any] | None:
    """``{"model": nn.Module, "batch": int, "size": int, "classes": int | None, "source": str}`` or None."""
    if name == "resnet20":
        from xnnq.models.cifar_resnet import resnet20_cifar10

        w = data.data_root() / "weights" / "resnet20_cifar10jpg.pt"
        return {
            "model": resnet20_cifar10(w if w.is_file() else None),
            "batch": 128,
            "size": 32,
            "classes": 10,
            "source": "CIFAR-10 weights" if w.is_file() else "random init",
        }
    if name in ("mobilenet_v2", "resnet18", "efficientnet_b0"):
        import torchvision

        torch.manual_seed(0)
        return {
            "model": getattr(torchvision.models, name)(weights=None),
            "batch": 16,
            "size": 224,
            "classes": 1000,
            "source": "random init",
        }
    if name == "mosaic_detector":
        from xnnq.models import zoo

        if name not in zoo.MODELS:
            return None
        torch.manual_seed(0)
        return {
            "model": zoo.get_model(name),
            "batch": 16,
            "size": 128,
            "classes": None,
            "source": "random init",
        }
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def _inputs(spec: dict, batches: int, seed: int) -> list[torch.Tensor]:
    """``batches`` input batches: CIFAR-10 training images for ResNet-20 when available, else N(0, 1)."""
    b, s = spec["batch"], spec["size"]
    if s == 32 and data.cifar10_available():
        x, y = data.cifar10("train")
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(y), generator=g)[: b * batches]
        return [xb for xb, _ in data.batches(x[idx], y[idx], b)]
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, s, s, generator=g) for _ in range(batches)]


def _loss(out: Any, y: torch.Tensor | None) -> torch.Tensor:
    if isinstance(out, torch.Tensor) and y is not None:
        return F.cross_entropy(out, y)
    outs = out if isinstance(out, (tuple, list)) else [out]
    return sum(o.float().pow(2).mean() for o in outs)


# ------------------------------------------------------------------------------------------- step
class Variant:
    """One trainable variant of the model with its optimizer."""

    def __init__(self, name: str, model: nn.Module):
        self.name, self.model = name, model.train()
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        self.opt.zero_grad(set_to_none=True)
        _loss(self.model(x), y).backward()
        self.opt.step()


def _timed(fn: Callable[[], None]) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def _minor_faults() -> int:
    """The process's minor page faults so far (first touches of freshly mapped memory, mostly)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def peak_step_bytes(v: Variant, x: torch.Tensor, y: torch.Tensor | None) -> int:
    """Peak bytes a train step allocates above its starting level (see the module docstring)."""
    v.opt.zero_grad(set_to_none=True)
    if x.is_cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _loss(v.model(x), y).backward()
        v.opt.step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _loss(v.model(x), y).backward()
        v.opt.step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    return max(itertools.accumulate((e.nbytes() for e in events), initial=0))


def _torch_ao_qat(model: nn.Module, example: torch.Tensor) -> nn.Module:
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare_qat_fx(model, get_default_qat_qconfig_mapping("x86"), (example,))


def measure_steps(spec: dict, steps: int, skip_ao: bool) -> dict[str, Any]:
    x = _inputs(spec, 1, seed=0)[0]
    y = (
        torch.randint(0, spec["classes"], (x.shape[0],), generator=torch.Generator().manual_seed(1))
        if spec["classes"]
        else None
    )
    float_model = spec["model"]
    dummy = x[:1]
    variants = [
        Variant("float", copy.deepcopy(float_model)),
        Variant("xnnq", xnnq.QuantTrainModule(float_model, dummy)),
    ]
    res: dict[str, Any] = {}
    if not skip_ao:
        try:
            variants.append(Variant("torch_ao", _torch_ao_qat(copy.deepcopy(float_model).train(), dummy)))
        except Exception as e:  # noqa: BLE001 - a peer that cannot trace the model is reported, not fatal
            res["torch_ao_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    for _ in range(2):
        for v in variants:
            v.step(x, y)
    wall: dict[str, list[float]] = {v.name: [] for v in variants}
    cpu: dict[str, list[float]] = {v.name: [] for v in variants}
    for r in range(steps):
        for v in variants[r % len(variants) :] + variants[: r % len(variants)]:
            w, c = _timed(lambda v=v: v.step(x, y))
            wall[v.name].append(w)
            cpu[v.name].append(c)
    for v in variants:
        res[f"{v.name}_step_ms"] = round(statistics.median(wall[v.name]) * 1e3, 1)
        res[f"{v.name}_step_cpu_ms"] = round(statistics.median(cpu[v.name]) * 1e3, 1)
    for v in variants[1:]:
        res[f"{v.name}_over_float"] = round(res[f"{v.name}_step_ms"] / res["float_step_ms"], 3)
        res[f"{v.name}_over_float_cpu"] = round(res[f"{v.name}_step_cpu_ms"] / res["float_step_cpu_ms"], 3)
    for v in variants:
        res[f"{v.name}_peak_mb"] = round(peak_step_bytes(v, x, y) / 2**20, 1)
    for v in variants[1:]:
        res[f"{v.name}_mem_over_float"] = round(res[f"{v.name}_peak_mb"] / res["float_peak_mb"], 3)
    for v in variants:
        try:
            res[f"{v.name}_ops_off_cpu"] = ops_off_cpu(v.model, x, y)
        except (RuntimeError, NotImplementedError) as e:  # a host read (or an op without a meta kernel)
            res[f"{v.name}_ops_off_cpu_error"] = _where(e)
    return res


def _where(e: BaseException) -> str:
    """The error's message and the innermost frame outside torch and this script that led to it."""
    import traceback

    frames = [f for f in traceback.extract_tb(e.__traceback__) if "/torch/_" not in f.filename]
    f = frames[-2] if len(frames) > 1 and frames[-1].filename == __file__ else frames[-1]
    return f"{type(e).__name__}: {str(e)[:120]} (at {Path(f.filename).name}:{f.lineno} `{f.line}`)"


class _OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched while active, views (no kernel) left out."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not func.is_view
        return func(*args, **(kwargs or {}))


def ops_off_cpu(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> int:
    """ATen ops (views left out) of one forward and backward of a copy of ``model`` on the ``meta`` device: the
    path CUDA takes (xnnq's C kernels are for CPU tensors only), where each is about one kernel launch. The
    model has taken its first steps on the CPU."""
    m = copy.deepcopy(model).to("meta")
    xm, ym = x.to("meta"), (None if y is None else y.to("meta"))
    with _OpCounter() as c:
        _loss(m(xm), ym).backward()
    return c.count


def measure_calibration(spec: dict, images: int, passes: int) -> dict[str, Any]:
    b = spec["batch"] if spec["size"] != 32 else 100
    spec = {**spec, "batch": b}
    xs = _inputs(spec, max(1, images // b), seed=2)
    float_model = copy.deepcopy(spec["model"]).eval()
    calib = QuantCalibrateModule(spec["model"], xs[0][:1]).train()
    t_float, t_calib, c_float, c_calib, f_float, f_calib = [], [], [], [], [], []
    with torch.no_grad():
        float_model(xs[0]), calib(xs[0])  # warm-up (first-batch work: histogram allocation, signedness)
        for _ in range(passes):
            tf = tc = cf = cc = 0.0
            ff = fc = 0
            for xb in xs:
                f0 = _minor_faults()
                w, c = _timed(lambda xb=xb: float_model(xb))
                f1 = _minor_faults()
                tf, cf, ff = tf + w, cf + c, ff + f1 - f0
                w, c = _timed(lambda xb=xb: calib(xb))
                tc, cc, fc = tc + w, cc + c, fc + _minor_faults() - f1
            t_float.append(tf)
            t_calib.append(tc)
            c_float.append(cf)
            c_calib.append(cc)
            f_float.append(ff)
            f_calib.append(fc)
    fin = _timed(calib.eval)[0]
    mf, mc = statistics.median(t_float), statistics.median(t_calib)
    cf, cc = statistics.median(c_float), statistics.median(c_calib)
    return {
        "calib_images": len(xs) * b,
        "float_forward_s": round(mf, 3),
        "calib_forward_s": round(mc, 3),
        "calib_over_float": round(mc / mf, 3),
        "float_forward_cpu_s": round(cf, 3),
        "calib_forward_cpu_s": round(cc, 3),
        "calib_over_float_cpu": round(cc / cf, 3),
        "calib_pass_ratios": [round(c / f, 3) for f, c in zip(t_float, t_calib)],
        "float_forward_minor_faults": int(statistics.median(f_float)),
        "calib_forward_minor_faults": int(statistics.median(f_calib)),
        "finalize_s": round(fin, 3),
    }


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    spec = _model_spec(name)
    if spec is None:
        return {"model": name, "skipped": "xnnq.models.zoo has no 'mosaic_detector' in this checkout"}
    res: dict[str, Any] = {
        "model": name,
        "input": [spec["batch"], 3, spec["size"], spec["size"]],
        "weights": spec["source"],
        "threads": torch.get_num_threads(),
        "malloc": args.malloc,
        "load_before": [round(v, 2) for v in os.getloadavg()],
    }
    t0 = time.perf_counter()
    if not args.skip_steps:
        res.update(measure_steps(spec, args.steps, args.skip_ao))
    if not args.skip_calib:
        n = args.calib_images or {32: 1000, 128: 256}.get(spec["size"], 128)
        res.update(measure_calibration(spec, n, args.calib_passes))
    res["load_after"] = [round(v, 2) for v in os.getloadavg()]
    res["seconds"] = round(time.perf_counter() - t0, 1)
    res["goals"] = _goals(res)
    return res


def _goals(res: dict[str, Any]) -> dict[str, bool]:
    goals = {}
    if "xnnq_over_float" in res:
        goals["step<=1.30"] = res["xnnq_over_float"] <= GOAL_STEP
        goals["mem<=1.3"] = res["xnnq_mem_over_float"] <= GOAL_MEM
    if "calib_over_float" in res:
        goals["calib<=1.10"] = res["calib_over_float"] <= GOAL_CALIB
    return goals


CALIB_KEYS = ("calib_", "float_forward", "finalize_s")
RATIO_KEYS = ("xnnq_over_float", "torch_ao_over_float", "xnnq_mem_over_float", "calib_over_float")
PROCESS_KEYS = (
    "calib_pass_ratios",
    "float_forward_s",
    "calib_forward_s",
    "float_forward_minor_faults",
    "calib_forward_minor_faults",
)


def _median_of_processes(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from the same measurement made in ``len(runs)`` processes: each number the median over the
    processes (a ratio the median of the processes' own ratios, each from one process's paired timings), the
    ratios of every process under ``per_process``."""
    res = dict(runs[0])
    for k, v in runs[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "threads":
            each = [r[k] for r in runs]
            res[k] = statistics.median_low(each) if isinstance(v, int) else round(statistics.median(each), 3)
    res["per_process"] = {k: [r[k] for r in runs] for k in RATIO_KEYS + PROCESS_KEYS if k in runs[0]}
    res.pop("calib_pass_ratios", None)
    return res


def _measure_apart(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """``name``'s steps and its calibration, each measured in ``--repeats`` child processes of their own
    (steps and calibration alternating), with the median over the processes."""
    steps, calib = not args.skip_steps, not args.skip_calib
    step_runs, calib_runs = [], []
    for _ in range(args.repeats):
        if steps:
            step_runs.append(_run_child(name, args, steps=True, calib=False))
            if "skipped" in step_runs[-1]:
                return step_runs[-1]
        if calib:
            calib_runs.append(_run_child(name, args, steps=False, calib=True))
    res = _median_of_processes(step_runs or calib_runs)
    if step_runs and calib_runs:
        cal = _median_of_processes(calib_runs)
        res.update({k: v for k, v in cal.items() if k.startswith(CALIB_KEYS)})
        res["per_process"].update(cal["per_process"])
        res["calib_load"] = [calib_runs[0]["load_before"][0], calib_runs[-1]["load_after"][0]]
    res["load_after"] = (calib_runs or step_runs)[-1]["load_after"]
    res["seconds"] = round(sum(r["seconds"] for r in step_runs + calib_runs), 1)
    res["processes"] = args.repeats
    res["goals"] = _goals(res)
    return res


def _spread(r: dict[str, Any], key: str) -> str:
    """``key``'s value, with the range over the processes when there were several."""
    if key not in r:
        return "—"
    each = r.get("per_process", {}).get(key, [])
    return f"{r[key]} ({min(each)}–{max(each)})" if len(each) > 1 else str(r[key])


def _ops(r: dict[str, Any]) -> str:
    """The three variants' ops off the CPU ("host read" where a variant could not run there)."""
    cells = []
    for v in ("float", "xnnq", "torch_ao"):
        n = r.get(f"{v}_ops_off_cpu")
        cells.append(str(n) if n is not None else "host read" if f"{v}_ops_off_cpu_error" in r else "—")
    return " / ".join(cells)


def _table(rows: list[dict]) -> str:
    head = (
        "| model | threads | malloc | float step ms | xnnq / float | torch.ao / float | peak MB float / xnnq (ratio) "
        "| calib / float fwd | ops off CPU float / xnnq / torch.ao | load (1 min) |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['model']} | — | — | skipped: {r['skipped']} | | | | | | |")
            continue
        lines.append(
            f"| {r['model']} | {r['threads']} | {r['malloc']} | {r.get('float_step_ms', '—')} | "
            f"{_spread(r, 'xnnq_over_float')} | {_spread(r, 'torch_ao_over_float')} | "
            f"{r.get('float_peak_mb', '—')} / {r.get('xnnq_peak_mb', '—')} ({r.get('xnnq_mem_over_float', '—')}) | "
            f"{_spread(r, 'calib_over_float')} | {_ops(r)} | {r['load_before'][0]}–{r['load_after'][0]} |"
        )
    return "\n".join(lines)


def keep_heap() -> None:
    """Keep freed memory in glibc's heap (``--malloc keep``): mmap and trim thresholds of 1 GiB."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError as e:
        raise SystemExit(f"bench_cost: --malloc keep needs glibc (libc.so.6): {e}") from e
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    if not (libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 30)):
        raise SystemExit("bench_cost: mallopt refused the thresholds")


def _run_child(name: str, args: argparse.Namespace, steps: bool, calib: bool) -> dict[str, Any]:
    """``name``'s steps and/or calibration measured by this script in a child process, with this run's settings
    (no ``--record``)."""
    cmd = [sys.executable, __file__, "--same-process", "--models", name, "--threads", str(args.threads)]
    cmd += ["--steps", str(args.steps), "--calib-images", str(args.calib_images)]
    cmd += ["--calib-passes", str(args.calib_passes), "--malloc", args.malloc]
    cmd += ["--skip-ao"] * args.skip_ao + ["--skip-calib"] * (not calib) + ["--skip-steps"] * (not steps)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or len(lines) != 1:
        raise SystemExit(f"bench_cost: {name} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(lines[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=9, help="timed rounds (one step of every variant each)")
    ap.add_argument(
        "--calib-images",
        type=int,
        default=0,
        help="0: 1000 for ResNet-20, 256 for the detector, 128 otherwise",
    )
    ap.add_argument("--calib-passes", type=int, default=5)
    ap.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="child processes per measurement; each number is the median over them (default 3)",
    )
    ap.add_argument("--skip-ao", action="store_true", help="leave out the torch.ao peer")
    ap.add_argument("--skip-calib", action="store_true")
    ap.add_argument("--skip-steps", action="store_true", help="calibration only")
    ap.add_argument(
        "--malloc",
        choices=("default", "keep"),
        default="default",
        help="keep: glibc keeps freed memory for reuse (see the docstring)",
    )
    ap.add_argument("--record", action="store_true", help="append the results to benchmarks/RESULTS.md")
    ap.add_argument(
        "--same-process",
        action="store_true",
        help="measure every model in this process (default: one child process per model)",
    )
    args = ap.parse_args()
    children = not args.same_process  # each measurement's heap as fresh as the first's
    if not children:
        if args.malloc == "keep":
            keep_heap()
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        r = _measure_apart(name, args) if children else run_model(name, args)
        print(json.dumps(r), flush=True)
        rows.append(r)
    if args.record:
        date = datetime.datetime.now().isoformat(timespec="seconds")
        cmd = "python benchmarks/bench_cost.py " + " ".join(sys.argv[1:])
        with RESULTS.open("a") as f:
            f.write(
                f"\n### bench_cost — {date}\n\n`{cmd}`; {json.dumps(machine())}\n\n{_table(rows)}\n\n"
                "<details><summary>JSON lines</summary>\n\n```json\n"
                + "\n".join(json.dumps(r) for r in rows)
                + "\n```\n</details>\n"
            )


if __name__ == "__main__":
    main()
