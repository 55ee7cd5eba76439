"""TIDL targets: one table of per-chip facts, each with its source, and the functions that read it.

A target is data. The wrappers read it for their numerics (:func:`resolve_numerics`), the export reads
it for the format, the compile options and the refusal of numerics the chip cannot run
(:func:`check_numerics`, :func:`compile_options`), and the importer-rule checker
(:mod:`xnnq.export.tidl_check`) reads its chip-specific operator limits. No ``if chip == ...`` lives
anywhere else. Where TI's documents are silent a fact is ``None`` and the code says so instead of
guessing; the sources are listed in :data:`SOURCES` and, with the facts, in ``docs/README_tidl.md``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

# TI documents the facts below come from (repository, path @ commit, section).
SOURCES: dict[str, str] = {
    "tidl-quant": "TexasInstruments/edgeai-tidl-tools docs/quantization.md @b3a7c2c, 'Post Training Quantization', "
    "'Quantization Aware Training (QAT) [J721E|TDA4VM Specific]', 'TIDL Layer Quantization Restrictions'",
    "tidl-fsg-quant": "TexasInstruments/edgeai-tidl-tools docs/tidl_fsg_quantization.md @95ba2c7 (rel 11.0), "
    "A.1 PTQ, A.2 Prequantized Models, B.1 Simple Calibration, C.1 Manual Mixed Precision",
    "tidl-compile": "TexasInstruments/edgeai-tidl-tools docs/model_compilation.md @19e8987, 'Compilation Options'; "
    "examples/osrt_python/README.md @95ba2c7, 'User options for TIDL Acceleration'",
    "tidl-ops": "TexasInstruments/edgeai-tidl-tools docs/operators.md @238cb8b, 'ONNX / Operators Supported'",
    "tidl-ops-11.0": "TexasInstruments/edgeai-tidl-tools docs/supported_ops_rts_versions.md @95ba2c7 (rel 11.0), "
    "'Operator Mapping (ONNX)', 'Feature set comparison across devices'",
    "tidl-quant-proto": "TexasInstruments/edgeai-tidl-tools docs/tidl_quantParams.md @95ba2c7 and "
    "docs/quantization_proto.md @b3a7c2c, 'Quantization Proto Specification', 'Known Limitations'",
    "tidl-io": "TexasInstruments/edgeai-tidl-tools docs/io_tensors.md @19e8987, 'eTIDL_ElementType'",
    "tidl-vtfr": "TexasInstruments/edgeai-tidl-tools docs/tidl_fsg_vtfr.md @95ba2c7, 'TIDL Layer Mapping of "
    "Transformer Operators' / 'GELU' (and its figure docs/images/transformer/GELU.png)",
    "modelopt-quant": "TexasInstruments/edgeai-modeloptimization torchmodelopt/edgeai_torchmodelopt/xmodelopt/"
    "quantization/README.md @6f4732f, 'Quantization methods supported'",
    "modelopt-v1-qat": "TexasInstruments/edgeai-modeloptimization .../xmodelopt/quantization/v1/docs/qat.md @6f4732f, "
    "'Compilation of QAT Models in TIDL'",
    "modelopt-v2-qat": "TexasInstruments/edgeai-modeloptimization .../xmodelopt/quantization/v2/docs/qat.md @6f4732f, "
    "'Compilation of QAT Models in TIDL' (prequantized_model 1, accuracy_level 0)",
    "benchmark-presets": "TexasInstruments/edgeai-tensorlab edgeai_benchmark/constants.py @076bc8b, "
    "TARGET_DEVICE_SETTINGS_PRESETS",
    "benchmark-options": "TexasInstruments/edgeai-tensorlab edgeai-benchmark/edgeai_benchmark/core/runtime_options.py "
    "@34607ac, runtime_options_onnx_qat_v1 / _qat_v2 / _qat_v2_p2, _get_calibration_accuracy_level",
    "benchmark-bias": "TexasInstruments/edgeai-tensorlab edgeai-benchmark/edgeai_benchmark/config_settings.py @2c0d332, "
    "_get_runtime_options_default (bias_clipping comment: 'bias is clipped to 16bits (default in "
    "TDA4VM)'; 'when quantization_scale_type is 4 ... per channel quantization is ALWAYS used')",
    "torchvision-quant": "TexasInstruments/edgeai-tensorlab docs/pixel2pixel/Quantization.md @09c96ee (legacy "
    "edgeai-torchvision QAT): power-of-2 symmetric per-tensor, 'an option to use Per-Channel Weight "
    "Quantization for Depthwise Convolution Layers'",
}

FORMATS = ("tidl", "qdq")
NUMERIC_KEYS = ("per_channel_q", "power2_weight_range", "power2_activation_range")
# today's behaviour without a target (TDA4VM-like, per-channel allowed when asked)
LEGACY_NUMERICS: dict[str, Any] = {
    "per_channel_q": False,
    "power2_weight_range": True,
    "power2_activation_range": True,
}

SCALE_TYPE_NP2, SCALE_TYPE_P2, SCALE_TYPE_TFLITE, SCALE_TYPE_NP2_PERCHAN = 0, 1, 3, 4


class TargetError(ValueError):
    """The numerics, format or options asked for cannot run on the target chip (the message says why)."""


@dataclass(frozen=True)
class Target:
    """What TIDL documents for one chip. ``None``: TI's documents do not say."""

    name: str
    aliases: tuple[str, ...]
    accelerator: str  # "MMAv1" / "MMAv2"
    power2_only: bool  # every scale a power of 2
    per_channel_weights: bool  # per-output-channel weight scales
    asymmetric: bool  # zero-points (xnnq exports symmetric, zero-point 0, on every chip)
    bias_bits: int | None  # accumulator bias width TIDL clips to (None: not documented)
    formats: tuple[str, ...]  # documented export formats; the first is the default
    free_scale_type: int | None  # quantization_scale_type for per-channel / non-power-of-2 models
    numerics: Mapping[str, Any]  # wrapper settings that train with the chip's recommended numerics
    conv_limits: frozenset[str] = frozenset()  # chip-only importer rules (see xnnq.export.tidl_check)
    lut_activations: bool = False  # LUT-accelerated Sigmoid/Tanh/Softmax/GELU/ELU...
    sources: Mapping[str, str] = field(default_factory=dict)  # fact -> SOURCES key

    def source(self, fact: str) -> str:
        return SOURCES[self.sources[fact]]

    def describe(self) -> dict[str, Any]:
        """The facts as plain data (for the JSON and the docs)."""
        return {
            "name": self.name,
            "aliases": list(self.aliases),
            "accelerator": self.accelerator,
            "power2_only": self.power2_only,
            "per_channel_weights": self.per_channel_weights,
            "asymmetric": self.asymmetric,
            "bias_bits": self.bias_bits,
            "formats": list(self.formats),
            "free_scale_type": self.free_scale_type,
            "numerics": dict(self.numerics),
            "conv_limits": sorted(self.conv_limits),
            "lut_activations": self.lut_activations,
        }


# the same documents give every chip's facts (the reference keys are defined in SOURCES above)
_FACT_SOURCES = {
    "accelerator": "modelopt-quant",
    "power2_only": "modelopt-quant",
    "per_channel_weights": "modelopt-quant",
    "asymmetric": "tidl-quant",
    "bias_bits": "benchmark-bias",
    "formats": "tidl-quant",
    "free_scale_type": "benchmark-presets",
    "lut_activations": "tidl-ops-11.0",
    "conv_limits": "tidl-ops",
}
_MMAV2_NUMERICS = {"per_channel_q": "all", "power2_weight_range": False, "power2_activation_range": False}


def _mmav2(name: str, aliases: tuple[str, ...], *, small: bool, lut: bool) -> Target:
    # AM62A and AM67A: Conv 3x3 stride 3, padding wider than the input, 16-bit ConvTranspose unsupported
    limits = frozenset({"conv_3x3_stride3", "conv_pad_gt_width", "deconv_16bit"}) if small else frozenset()
    return Target(
        name,
        aliases,
        "MMAv2",
        power2_only=False,
        per_channel_weights=True,
        asymmetric=True,
        bias_bits=None,
        formats=("qdq",),
        free_scale_type=SCALE_TYPE_NP2_PERCHAN,
        numerics=_MMAV2_NUMERICS,
        conv_limits=limits,
        lut_activations=lut,
        sources=_FACT_SOURCES,
    )


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target(
            "TDA4VM",
            ("J721E", "AM68PA"),
            "MMAv1",
            power2_only=True,
            per_channel_weights=False,
            asymmetric=False,
            bias_bits=16,
            formats=("tidl", "qdq"),
            free_scale_type=None,
            numerics=LEGACY_NUMERICS,
            lut_activations=True,
            sources=_FACT_SOURCES,
        ),
        _mmav2("AM68A", ("TDA4VL", "TDA4AL", "TDA4VE", "J721S2"), small=False, lut=True),
        _mmav2("AM69A", ("TDA4VH", "J784S4"), small=False, lut=True),
        _mmav2("AM62A", (), small=True, lut=False),
        _mmav2("AM67A", ("J722S", "TDA4AEN"), small=True, lut=True),
    )
}


def target_names() -> str:
    return ", ".join(
        f"{t.name}" + (f" ({', '.join(t.aliases)})" if t.aliases else "") for t in TARGETS.values()
    )


def get_target(target: str | Target) -> Target:
    """The :class:`Target` for a name or alias (case-insensitive)."""
    if isinstance(target, Target):
        return target
    key = str(target).strip().upper()
    for t in TARGETS.values():
        if key == t.name or key in t.aliases:
            return t
    raise TargetError(f"unknown TIDL target {target!r}; known targets: {target_names()}")


def export_formats(target: str | Target | None) -> tuple[str, ...]:
    """The export formats to write for ``target``: the chip's documented ones, or both without a target."""
    return get_target(target).formats if target is not None else FORMATS


def wrapper_settings(target: str | Target) -> dict[str, Any]:
    """The wrapper keyword settings that train and calibrate with the chip's recommended numerics."""
    return dict(get_target(target).numerics)


def check_settings(
    target: str | Target, per_channel_q: Any, power2_weight_range: bool, power2_activation_range: bool
) -> None:
    """Raise :class:`TargetError` when these wrapper settings give numerics ``target`` cannot run."""
    t = get_target(target)
    reasons = []
    if t.power2_only and not (power2_weight_range and power2_activation_range):
        which = [
            k
            for k, v in (
                ("power2_weight_range", power2_weight_range),
                ("power2_activation_range", power2_activation_range),
            )
            if not v
        ]
        reasons.append(
            f"{' and '.join(which)}=False asks for non-power-of-2 scales; {t.name} ({t.accelerator}) "
            f"quantizes with power-of-2 scales only [{t.source('power2_only')}]"
        )
    if per_channel_q not in (False, None) and not t.per_channel_weights:
        reasons.append(
            f"per_channel_q={per_channel_q!r} asks for per-channel weight scales; {t.name} quantizes "
            f"weights per tensor [{t.source('per_channel_weights')}] (the legacy edgeai-torchvision QAT "
            f"mentions a per-channel option for depthwise layers [{SOURCES['torchvision-quant']}], but no "
            "TIDL compile option selects it for a QAT/pre-quantized model)"
        )
    if reasons:
        raise TargetError(
            f"target {t.name}: " + "; ".join(reasons) + f". Use the target's numerics "
            f"({_kw(t.numerics)}) or leave them unset."
        )


def _kw(d: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in d.items())


def resolve_numerics(target: str | Target | None, **given: Any) -> dict[str, Any]:
    """Wrapper numerics: each of :data:`NUMERIC_KEYS` as given, or (``None``) the target's — or, with no
    target, today's defaults. Explicit settings the target cannot run raise :class:`TargetError`.

    Returns the three settings and ``"target"`` (the target's name, or None).
    """
    unknown = set(given) - set(NUMERIC_KEYS)
    if unknown:
        raise TypeError(f"resolve_numerics: unknown settings {sorted(unknown)}")
    base = LEGACY_NUMERICS if target is None else get_target(target).numerics
    out = {k: (base[k] if given.get(k) is None else given[k]) for k in NUMERIC_KEYS}
    if target is not None:
        check_settings(target, **out)
    out["target"] = None if target is None else get_target(target).name
    return out


# ------------------------------------------------------------------------------ export-time numerics
@dataclass(frozen=True)
class Quantity:
    """One quantized tensor of an export, as the refusal check sees it."""

    name: str
    kind: str  # "activation" / "weight"
    bits: int
    power2: bool
    per_channel: bool = False


def check_numerics(target: str | Target, fmt: str, quantities: Iterable[Quantity]) -> list[str]:
    """Reasons (empty: none) why ``target`` cannot run these quantized tensors in export format ``fmt``."""
    t = get_target(target)
    qs = list(quantities)
    reasons = []
    if fmt not in t.formats:
        if fmt == "tidl":
            reasons.append(
                f"format='tidl' (float graph with Clip ranges, TIDL's QAT flow) is documented for J721E/"
                f"TDA4VM only [{SOURCES['tidl-quant']}]; {t.name} imports pre-quantized models as ONNX QDQ "
                f"[{SOURCES['modelopt-v2-qat']}]: use format='qdq'"
            )
        else:
            reasons.append(f"format={fmt!r} is not among {t.name}'s documented formats {t.formats}")
    not_p2 = [q.name for q in qs if not q.power2]
    if t.power2_only and not_p2:
        reasons.append(
            f"{len(not_p2)} tensor(s) have non-power-of-2 scales ({_few(not_p2)}); {t.name} "
            f"({t.accelerator}) runs power-of-2 scales only [{t.source('power2_only')}]"
        )
    per_ch = [q.name for q in qs if q.per_channel]
    if per_ch and not t.per_channel_weights:
        reasons.append(
            f"{len(per_ch)} layer(s) have per-channel weight scales ({_few(per_ch)}); {t.name} quantizes "
            f"weights per tensor [{t.source('per_channel_weights')}]"
        )
    acts_np2 = [q.name for q in qs if q.kind == "activation" and not q.power2]
    if fmt == "tidl" and acts_np2 and not t.power2_only:
        reasons.append(
            f"format='tidl' passes activation ranges as Clips, which TIDL's simple calibration turns into "
            f"power-of-2 feature-map scales only [{SOURCES['tidl-fsg-quant']}]; {_few(acts_np2)} are not "
            "power-of-2"
        )
    return reasons


def _few(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def refuse(target: str | Target, fmt: str, quantities: Iterable[Quantity], where: str = "export") -> None:
    """Raise :class:`TargetError` naming every reason ``target`` cannot run these numerics in ``fmt``."""
    reasons = check_numerics(target, fmt, quantities)
    if reasons:
        t = get_target(target)
        raise TargetError(
            f"{where}: the model cannot run on {t.name} as built: "
            + "; ".join(reasons)
            + f". Build the wrapper with target={t.name!r} (numerics: {_kw(t.numerics)}) or choose "
            "another target."
        )


# ------------------------------------------------------------------------------ compile options
# every option xnnq writes or passes through, with where TI documents it
KNOWN_OPTIONS: dict[str, str] = {
    "tensor_bits": "tidl-compile",
    "accuracy_level": "tidl-compile",
    "debug_level": "tidl-compile",
    "advanced_options:quantization_scale_type": "tidl-compile",
    "advanced_options:prequantized_model": "tidl-compile",
    "advanced_options:quant_params_proto_path": "tidl-compile",
    "advanced_options:output_feature_16bit_names_list": "tidl-compile",
    "advanced_options:params_16bit_names_list": "tidl-compile",
    "advanced_options:mixed_precision_factor": "tidl-compile",
    "advanced_options:add_data_convert_ops": "tidl-compile",
    "advanced_options:high_resolution_optimization": "tidl-compile",
    "advanced_options:calibration_frames": "tidl-compile",
    "advanced_options:calibration_iterations": "tidl-compile",
    "advanced_options:activation_clipping": "tidl-compile",
    "advanced_options:weight_clipping": "tidl-compile",
    "advanced_options:bias_calibration": "tidl-compile",
    "advanced_options:channel_wise_quantization": "tidl-compile",
    "advanced_options:pre_batchnorm_fold": "tidl-compile",
    "advanced_options:inference_mode": "tidl-compile",
    "advanced_options:num_cores": "tidl-compile",
    "advanced_options:network_name": "tidl-compile",
    "advanced_options:c7x_firmware_version": "tidl-compile",
    "max_num_subgraphs": "tidl-compile",
    "deny_list:layer_type": "tidl-compile",
    "deny_list:layer_name": "tidl-compile",
    "allow_list:layer_name": "tidl-compile",
    "model_type": "tidl-compile",
    "object_detection:meta_arch_type": "tidl-compile",
    "object_detection:meta_layers_names_list": "tidl-compile",
}
# the options xnnq decides from the model; a user override of these is refused (it would not match the file)
DERIVED_OPTIONS = (
    "tensor_bits",
    "accuracy_level",
    "advanced_options:quantization_scale_type",
    "advanced_options:prequantized_model",
    "advanced_options:quant_params_proto_path",
    "advanced_options:output_feature_16bit_names_list",
    "advanced_options:params_16bit_names_list",
)

FLOWS = ("tidl", "qdq", "quant_params")


def scale_type(target: str | Target, all_power2: bool, per_channel: bool) -> int:
    """``advanced_options:quantization_scale_type`` for a model with these scales on ``target``.

    Power-of-2 per-tensor: 1 (TI's QAT v1 and ``qat_v2_p2`` settings); per-channel or non-power-of-2: the
    target's per-channel type 4 (TI's ``qat_v2`` setting; per-channel is used only with type 4).
    """
    t = get_target(target)
    if all_power2 and not per_channel:
        return SCALE_TYPE_P2
    if t.free_scale_type is None:
        raise TargetError(
            f"{t.name} has no scale type for per-channel or non-power-of-2 models "
            f"[{t.source('free_scale_type')}]"
        )
    return t.free_scale_type


def compile_options(
    target: str | Target,
    flow: str,
    *,
    tensor_bits: int,
    all_power2: bool,
    per_channel: bool,
    feature_16bit: list[str] | None = None,
    params_16bit: list[str] | None = None,
    quant_params_path: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """TIDL compile options for an export of ``flow`` on ``target``.

    * ``"tidl"``: float graph with Clip ranges — ``accuracy_level`` 0, power-of-2 scale type (TDA4VM QAT).
    * ``"qdq"``: ``advanced_options:prequantized_model`` 1, ``accuracy_level`` 0, the scale type of the model.
    * ``"quant_params"``: a float graph whose ranges (8- and 16-bit) come from the quantization-parameters
      file at ``quant_params_path``; ``accuracy_level`` 0 and the 16-bit name lists.

    ``extra``: further options from :data:`KNOWN_OPTIONS` (e.g. ``advanced_options:add_data_convert_ops``).
    """
    t = get_target(target)
    if flow not in FLOWS:
        raise ValueError(f"flow must be one of {FLOWS}, got {flow!r}")
    st = scale_type(t, all_power2, per_channel)
    if flow == "quant_params" and st == SCALE_TYPE_NP2_PERCHAN:
        st = SCALE_TYPE_NP2  # the proto mechanism is symmetric only [tidl-quant-proto]; type 4 is asymmetric
    opts: dict[str, Any] = {
        "tensor_bits": tensor_bits,
        "accuracy_level": 0,
        "advanced_options:quantization_scale_type": st,
    }
    if flow == "qdq":
        opts["advanced_options:prequantized_model"] = 1
    if flow == "quant_params":
        if not quant_params_path:
            raise ValueError("flow 'quant_params' needs quant_params_path")
        opts["advanced_options:quant_params_proto_path"] = quant_params_path
    if feature_16bit:
        opts["advanced_options:output_feature_16bit_names_list"] = ",".join(feature_16bit)
    if params_16bit:
        opts["advanced_options:params_16bit_names_list"] = ",".join(params_16bit)
    for k, v in (extra or {}).items():
        if k not in KNOWN_OPTIONS:
            raise ValueError(f"unknown TIDL compile option {k!r}; known: {', '.join(sorted(KNOWN_OPTIONS))}")
        if k in DERIVED_OPTIONS:
            raise ValueError(
                f"{k!r} is derived from the exported model ({opts.get(k, 'unset')!r}); it cannot be "
                "overridden without making the options disagree with the file"
            )
        opts[k] = v
    return opts
