"""The ``xnnq`` parser and its commands: ``demo``, ``quantize``, ``eval``, ``analyze``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .. import data
from ..targets import target_names
from .errors import CliError
from .loading import default_input_size, default_weights, load_model, load_split, split_dirs
from .tasks import TASKS

MODEL_HELP = (
    "resnet20 (CIFAR-10 ResNet-20), one of xnnq's networks with its checkpoint (mosaic_detector, mosaic_segmenter, "
    "mobilenetv1, repvgg, qarepvgg, mobileone), a torchvision.models name (e.g. resnet18, mobilenet_v2; random "
    "init unless --weights), or package.module:attr (a model, a class or a factory; e.g. xnnq.demo:tiny_cnn)"
)


def _add_model_args(p: argparse.ArgumentParser, data_required: bool = False) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", required=True, metavar="NAME", help=MODEL_HELP)
    g.add_argument(
        "--weights",
        metavar="FILE",
        help="float state dict (torch.save(model.state_dict())), read with "
        "weights_only=True. Default for resnet20: $XNNQ_DATA/weights/resnet20_cifar10jpg.pt if present",
    )
    g.add_argument(
        "--num-classes",
        type=int,
        metavar="N",
        help="classifier outputs (default: the model's own with "
        "--weights, else the number of class folders in --data)",
    )
    g.add_argument(
        "--data",
        metavar="DIR",
        help="ImageFolder data: DIR/<class>/<image>, or DIR/train and DIR/test "
        "(or val). Default: $XNNQ_DATA/cifar10 (XNNQ_DATA defaults to ../shared/data)",
    )
    g.add_argument(
        "--input-size",
        type=int,
        metavar="PX",
        help="square input size; images are resized and "
        "center-cropped to it (default: 32 for resnet20, 224 for torchvision, else the images' size)",
    )
    g.add_argument(
        "--limit-train",
        type=int,
        metavar="N",
        help="use at most N training images, classes in turn (default: all; PTQ: --calib-images)",
    )
    g.add_argument(
        "--limit-test",
        type=int,
        metavar="N",
        help="use at most N test images (default: all; analyze: --analysis-images)",
    )
    g.add_argument("--batch-size", type=int, default=64, metavar="B", help="batch size (default 64)")


def _add_quant_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("quantization")
    g.add_argument("--bits", type=int, choices=(8, 16), default=8, help="weights and activations (default 8)")
    g.add_argument(
        "--target",
        metavar="CHIP",
        help=f"the TIDL chip the model is for: {target_names()}; numerics, export formats and compile "
        "options follow it (default: none, TDA4VM-like numerics, both formats)",
    )
    g.add_argument(
        "--per-channel",
        choices=("none", "depthwise", "all"),
        default=None,
        help="per-channel weight scales (default: the target's, else none: per tensor)",
    )
    g.add_argument(
        "--sixteen-bit",
        nargs="+",
        metavar="LAYER",
        default=None,
        help="layers (names or globs, or first/last) in 16 bits, e.g. --sixteen-bit first last",
    )
    g.add_argument(
        "--silu",
        choices=("fused", "sigmoid_mul"),
        default=None,
        help="sigmoid_mul: quantize a SiLU's sigmoid too, as TIDL runs it (slower QAT; default fused)",
    )
    g.add_argument(
        "--no-constrain-weights",
        action="store_true",
        help="do not clip weight outliers at ±15σ (try it when the analysis shows W clip %% > 0)",
    )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="xnnq",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Quantization-aware training, calibration, TIDL-ready ONNX export, per-layer analysis.",
        epilog="examples:\n"
        "  xnnq demo                                   # no data needed: train, QAT, export, check\n"
        "  xnnq quantize --model resnet20 --mode ptq --out runs/r20_ptq\n"
        "  xnnq quantize --model resnet18 --weights r18.pt --data imgs/ --mode qat --epochs 1 "
        "--out runs/r18\n"
        "  xnnq eval --model resnet20 --quant-dir runs/r20_ptq --onnx runs/r20_ptq/model_tidl.onnx\n"
        "  xnnq analyze --model resnet20 --out runs/r20_analysis\n"
        "environment: XNNQ_DATA (shared data folder), XNNQ_DEBUG=1 (show tracebacks).",
    )
    ap.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's; demo: 1)")
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "demo",
        help="self-contained demo: small CNN on generated data, QAT, export, onnxruntime check",
        description="Builds a small CNN, trains it briefly on generated images (4 orientations of "
        "noisy gratings), runs QAT, exports the TIDL and QDQ ONNX files, checks both in onnxruntime "
        "against PyTorch, writes the per-layer analysis and prints a summary. Needs no data or weights.",
    )
    p.add_argument("--out", default="xnnq_demo", metavar="DIR", help="output folder (default ./xnnq_demo)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--train-images", type=int, default=2048, metavar="N", help="generated training images (default 2048)"
    )
    p.add_argument(
        "--test-images", type=int, default=512, metavar="N", help="generated test images (default 512)"
    )
    p.add_argument("--epochs", type=int, default=3, help="float training epochs (default 3)")
    p.add_argument("--qat-epochs", type=float, default=1.0, help="QAT epochs (default 1)")

    p = sub.add_parser(
        "quantize",
        help="PTQ or QAT a model, export both ONNX formats, write the analysis",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Quantize a float model for TIDL. Writes to --out: model_tidl.onnx and "
        "model_qdq.onnx (each with its TIDL options JSON <name>.tidl.json), quant_state.pt and "
        "quant_config.json (reload with --quant-dir), analysis/report.md|json and PNG plots, and "
        "summary.json (accuracies and the onnxruntime check).",
    )
    _add_model_args(p)
    _add_quant_args(p)
    p.add_argument(
        "--task",
        choices=TASKS,
        default="classification",
        help="classification (default; ImageFolder data, top-1, the analysis); detection (an SSD-style core "
        "with model.meta_arch, e.g. --model mosaic_detector; --data with train/ and val/ holding COCO "
        "instances.json; mAP; the ONNX files with their meta-architecture prototxt); segmentation (logits "
        "out, e.g. --model mosaic_segmenter; --data with train/ and val/ holding images/ and masks/; "
        "mIoU; the ONNX files end in ArgMax). For detection and segmentation --data defaults to "
        "$XNNQ_DATA/mosaic10, QAT uses AdamW at --lr, and no analysis is written",
    )
    p.add_argument(
        "--mode",
        choices=("qat", "ptq"),
        required=True,
        help="qat: quantization-aware training; ptq: calibration only",
    )
    p.add_argument(
        "--epochs", type=float, default=1.0, help="QAT epochs over the training images (default 1)"
    )
    p.add_argument(
        "--lr", type=float, default=1e-4, help="QAT learning rate, SGD Nesterov + cosine (default 1e-4)"
    )
    p.add_argument(
        "--range-learning",
        choices=("statistics", "tqt", "tqt-activations"),
        default="statistics",
        help="QAT ranges: statistics (default: they follow the data), tqt (learned power-of-2 thresholds for "
        "activations and weights, trained by their own Adam at lr 1e-2; on a chip with free scales the "
        "ranges become powers of 2), tqt-activations (activations only)",
    )
    p.add_argument(
        "--method",
        choices=("max", "percentile", "mse", "entropy"),
        default="mse",
        help="PTQ range method (default mse)",
    )
    p.add_argument(
        "--calib-images", type=int, default=512, metavar="N", help="PTQ calibration images (default 512)"
    )
    p.add_argument(
        "--analysis-images",
        type=int,
        default=256,
        metavar="N",
        help="test images for the analysis (default 256; 0 skips the analysis)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")

    p = sub.add_parser(
        "eval",
        help="top-1 accuracy of the float model, a quantized model and/or ONNX files",
        description="Evaluate on the test images of --data: the float model, the quantized model "
        "written by `xnnq quantize` (--quant-dir) and ONNX files in onnxruntime (--onnx).",
    )
    _add_model_args(p)
    p.add_argument(
        "--quant-dir",
        metavar="DIR",
        help="an --out folder of `xnnq quantize` (quant_state.pt + quant_config.json)",
    )
    p.add_argument("--onnx", nargs="+", metavar="FILE", default=[], help="ONNX files to run in onnxruntime")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")

    p = sub.add_parser(
        "analyze",
        help="per-layer quantization analysis: report (md/json) and PNG plots",
        description="Per-layer analysis (weight/activation SQNR, ranges and clipping, INT/POT/FLOAT "
        "formats, sensitivity ranking, 16-bit suggestion) of a quantized model: the one written by "
        "`xnnq quantize` (--quant-dir), or a PTQ calibration made here.",
    )
    _add_model_args(p)
    _add_quant_args(p)
    p.add_argument(
        "--quant-dir", metavar="DIR", help="analyze the model written by `xnnq quantize --out DIR`"
    )
    p.add_argument(
        "--method",
        choices=("max", "percentile", "mse", "entropy"),
        default="mse",
        help="without --quant-dir: PTQ range method (default mse)",
    )
    p.add_argument(
        "--calib-images", type=int, default=512, metavar="N", help="without --quant-dir: calibration images"
    )
    p.add_argument(
        "--analysis-images", type=int, default=256, metavar="N", help="test images analysed (default 256)"
    )
    p.add_argument(
        "--sensitivity-batches",
        type=int,
        default=4,
        metavar="N",
        help="batches per sensitivity pass (default 4)",
    )
    p.add_argument(
        "--target-drop",
        type=float,
        metavar="PP",
        help="suggest the 16-bit layers for this estimated "
        "top-1 agreement drop (points); default: the 3 most sensitive",
    )
    p.add_argument(
        "--out", required=True, metavar="DIR", help="output folder for report.md, report.json and PNGs"
    )
    return ap


# ------------------------------------------------------------------------------------------- helpers
class _Setup:
    """The model, dummy input and data shared by quantize / eval / analyze."""

    def __init__(
        self,
        args: argparse.Namespace,
        need_train: bool,
        config: dict[str, Any] | None = None,
        train_limit: int | None = None,
        test_limit: int | None = None,
    ):
        cfg = config or {}
        if config and args.model != cfg["model"]:
            raise CliError(
                f"--model {args.model} differs from the quantized model's ({cfg['model']}) in --quant-dir"
            )
        root = Path(args.data) if args.data else data.data_root() / "cifar10"
        if not args.data and not root.is_dir():
            raise CliError(
                f"no --data given and the default {root} does not exist (set XNNQ_DATA or pass --data DIR)"
            )
        train_dir, test_dir = split_dirs(root)
        for n, v in (("--batch-size", args.batch_size), ("--input-size", args.input_size)):
            if v is not None and v <= 0:
                raise CliError(f"{n} must be positive, got {v}")
        self.size = args.input_size or cfg.get("input_size") or default_input_size(args.model, train_dir)
        self.x_te, self.y_te, n_classes = load_split(test_dir, self.size, args.limit_test or test_limit)
        self.x_tr = self.y_tr = None
        if need_train:
            self.x_tr, self.y_tr, _ = load_split(train_dir, self.size, args.limit_train or train_limit)
        self.weights = args.weights or cfg.get("weights") or default_weights(args.model)
        self.num_classes = args.num_classes or cfg.get("num_classes") or (None if self.weights else n_classes)
        self.model = load_model(args.model, self.weights, self.num_classes)
        self.dummy = torch.randn(1, 3, self.size, self.size)

    def config(self, args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
        weights = str(Path(self.weights).resolve()) if self.weights else None
        return {
            "model": args.model,
            "weights": weights,
            "num_classes": self.num_classes,
            "input_size": self.size,
            **extra,
        }


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=1, default=str))


# ------------------------------------------------------------------------------------------ commands
def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import format_summary, run_demo

    for n in ("train_images", "test_images", "epochs"):
        if getattr(args, n) <= 0:
            raise CliError(f"--{n.replace('_', '-')} must be positive")
    s = run_demo(
        Path(args.out),
        train_images=args.train_images,
        test_images=args.test_images,
        epochs=args.epochs,
        qat_epochs=args.qat_epochs,
        seed=args.seed,
        progress=not args.no_progress,
    )
    print(format_summary(s))
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from ..quantize import QuantTrainModule
    from ..recipes import qat_finetune
    from .steps import (
        calibrate_ptq,
        check_onnx,
        export_both,
        for_chip,
        save_quant,
        wrapper_kwargs,
        write_analysis,
        write_summary,
    )

    if args.mode == "qat" and args.epochs <= 0:
        raise CliError(f"--epochs must be > 0 for --mode qat, got {args.epochs}")
    if args.mode == "ptq" and args.range_learning != "statistics":
        raise CliError(
            f"--range-learning {args.range_learning} learns ranges in training: use it with --mode qat"
        )
    t0 = time.perf_counter()
    kw = wrapper_kwargs(args)
    if "range_learning" in kw and "power2_activation_range" in kw:
        print(
            f"xnnq quantize: --range-learning {args.range_learning} learns power-of-2 ranges: {kw['target']}'s "
            "free scales are replaced by powers of 2 (the chip runs those too)",
            file=sys.stderr,
        )
    if args.task != "classification":
        from .tasks import quantize_task

        if args.batch_size <= 0 or args.calib_images <= 0:
            raise CliError("--batch-size and --calib-images must be positive")
        weights = args.weights or default_weights(args.model)
        return quantize_task(args, kw, load_model(args.model, weights, args.num_classes), weights)
    st = _Setup(args, need_train=True, train_limit=args.calib_images if args.mode == "ptq" else None)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    if (
        st.weights is None
    ):  # random init: keep it, so that eval/analyze --quant-dir rebuild the same float model
        st.weights = str((out / "float_weights.pt").resolve())
        torch.save(st.model.state_dict(), st.weights)
    float_acc = data.evaluate(st.model, st.x_te, st.y_te, progress=progress)
    if args.mode == "ptq":
        n = min(args.calib_images, len(st.y_tr))
        q = calibrate_ptq(
            st.model,
            st.dummy,
            st.x_tr[:n],
            st.y_tr[:n],
            batch_size=args.batch_size,
            method=args.method,
            kwargs=kw,
            progress=progress,
        )
    else:
        train = data.Batches(
            st.x_tr,
            st.y_tr,
            args.batch_size,
            shuffle=True,
            train_augment=True,
            generator=torch.Generator().manual_seed(0),
        )
        q = qat_finetune(
            QuantTrainModule(st.model, st.dummy, **kw),
            train,
            epochs=args.epochs,
            lr=args.lr,
            progress=progress,
        )
    quant_acc = data.evaluate(q, st.x_te, st.y_te, progress=progress)
    save_quant(q, out, st.config(args, mode=args.mode, method=args.method, kwargs=kw))
    paths = export_both(q, st.dummy, out, progress=progress)
    onnx = check_onnx(paths, q, st.x_te, st.y_te, batch_size=args.batch_size, progress=progress)
    summary: dict[str, Any] = {
        "model": args.model,
        "target": kw.get("target"),
        "mode": args.mode,
        "float_accuracy": float_acc,
        "quant_accuracy": quant_acc,
        "test_images": len(st.y_te),
        "onnx": onnx,
    }
    if args.analysis_images > 0:
        n = min(args.analysis_images, len(st.y_te))
        summary["analysis"] = write_analysis(
            q,
            st.model,
            st.x_te[:n],
            st.y_te[:n],
            out / "analysis",
            batch_size=args.batch_size,
            progress=progress,
        )
    path = write_summary(out, summary, t0)
    print(
        f"{args.model} {args.mode.upper()}{for_chip(kw)}: float {float_acc:.2f} % -> quantized {quant_acc:.2f} % "
        f"on {len(st.y_te)} test images"
    )
    for r in onnx.values():
        print(
            f"  {r['path']}: onnxruntime {r['accuracy']:.2f} %, "
            f"top-1 agreement {r['top1_agreement_pct']:.2f} %"
        )
    if "analysis" in summary:
        print(f"  analysis: {summary['analysis']['report']}")
    print(f"  summary: {path}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .steps import load_quant, read_config

    cfg = read_config(args.quant_dir) if args.quant_dir else None
    missing = [f for f in args.onnx if not Path(f).is_file()]
    if missing:
        raise CliError(f"--onnx: no such file: {', '.join(missing)}")
    st = _Setup(args, need_train=False, config=cfg)
    progress = not args.no_progress
    res: dict[str, Any] = {
        "model": args.model,
        "test_images": len(st.y_te),
        "float_accuracy": data.evaluate(st.model, st.x_te, st.y_te, progress=progress),
    }
    if args.quant_dir:
        q = load_quant(st.model, st.dummy, args.quant_dir)
        res["quant_accuracy"] = data.evaluate(q, st.x_te, st.y_te, progress=progress)
    if args.onnx:
        from ..export.check import onnx_accuracy

        n = (len(st.y_te) + args.batch_size - 1) // args.batch_size
        res["onnx_accuracy"] = {
            f: onnx_accuracy(
                f,
                tqdm(
                    data.batches(st.x_te, st.y_te, args.batch_size),
                    total=n,
                    desc=f"onnxruntime {Path(f).name}",
                    disable=not progress,
                ),
            )
            for f in args.onnx
        }
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    _print_json(res)
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from .steps import calibrate_ptq, load_quant, read_config, wrapper_kwargs, write_analysis

    if args.analysis_images <= 0 or args.sensitivity_batches <= 0:
        raise CliError("--analysis-images and --sensitivity-batches must be positive")
    cfg = read_config(args.quant_dir) if args.quant_dir else None
    st = _Setup(
        args,
        need_train=cfg is None,
        config=cfg,
        train_limit=args.calib_images,
        test_limit=args.analysis_images,
    )
    progress = not args.no_progress
    if cfg is not None:
        q = load_quant(st.model, st.dummy, args.quant_dir)
    else:
        n = min(args.calib_images, len(st.y_tr))
        q = calibrate_ptq(
            st.model,
            st.dummy,
            st.x_tr[:n],
            st.y_tr[:n],
            batch_size=args.batch_size,
            method=args.method,
            progress=progress,
            kwargs=wrapper_kwargs(args),
        )
    n = min(args.analysis_images, len(st.y_te))
    res = write_analysis(
        q,
        st.model,
        st.x_te[:n],
        st.y_te[:n],
        Path(args.out),
        batch_size=args.batch_size,
        sensitivity_batches=args.sensitivity_batches,
        target_drop=args.target_drop,
        progress=progress,
    )
    print(f"most sensitive: {', '.join(res['most_sensitive'])}")
    s = res["suggest_16bit"]
    print(f"16-bit suggestion ({s['rule']}): {', '.join(s['layers']) or 'none'}")
    print(f"report: {res['report']}\nplots: {', '.join(res['plots'])}")
    return 0


COMMANDS = {"demo": cmd_demo, "quantize": cmd_quantize, "eval": cmd_eval, "analyze": cmd_analyze}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``xnnq`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads <= 0:
            parser.error(f"--threads must be positive, got {args.threads}")
        torch.set_num_threads(args.threads)
    elif args.command == "demo":
        torch.set_num_threads(1)  # a tiny network: more threads add overhead, not speed
    try:
        return COMMANDS[args.command](args)
    except CliError as e:
        print(f"xnnq {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, TypeError, RuntimeError) as e:
        if os.environ.get("XNNQ_DEBUG"):
            raise
        print(
            f"xnnq {args.command}: error: {type(e).__name__}: {e}\n(set XNNQ_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1
