"""QuantConfig: the wrappers' settings as one value; keyword arguments build it."""

import dataclasses

import pytest
import torch

import xnnq
from xnnq.calibrate import HistogramRanges, QuantCalibrateModule
from xnnq.models.cifar_resnet import resnet20
from xnnq.quantize import QuantConfig

DUMMY = torch.randn(1, 3, 32, 32)


def test_keywords_and_config_build_the_same_plan():
    kw = {
        "bitwidth_weights": 16,
        "per_channel_q": "all",
        "bitwidth_overrides": {"first": 8},
        "constrain_weights": False,
        "clip_ranges": {"input_q": 4.0},
    }
    by_kw = xnnq.QuantTrainModule(resnet20(), DUMMY, **kw)
    by_cfg = xnnq.QuantTrainModule(resnet20(), DUMMY, config=QuantConfig(**kw))
    assert by_kw.config == by_cfg.config == QuantConfig(**kw)
    assert by_kw.plan.to_dict() == by_cfg.plan.to_dict()
    weights = {w.name: (w.bits, w.per_channel) for w in by_cfg.plan.weights}
    assert weights["conv1"] == (8, True) and weights["linear"] == (16, True)
    assert float(by_cfg.quantizers()["input_q"].clip_values()[1]) == 4.0
    assert not by_cfg.module.get_submodule("conv1").constrain_weights


def test_keywords_replace_fields_of_a_given_config():
    base = QuantConfig(bitwidth_activations=16, per_channel_q="depthwise")
    q = QuantCalibrateModule(resnet20(), DUMMY, config=base, per_channel_q="all", method="max")
    assert q.config == dataclasses.replace(
        base, per_channel_q="all", activation_observer=HistogramRanges("max")
    )
    assert all(p.bits == 16 for p in q.quantizers().values())
    assert all(w.per_channel for w in q.plan.weights)


def test_config_is_not_changed_by_the_callers_dicts():
    overrides = {"first": 16}
    cfg = QuantConfig(bitwidth_overrides=overrides)
    overrides["last"] = 16
    assert cfg.bitwidth_overrides == {"first": 16}
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.bitwidth_weights = 16


def test_unknown_setting_names_the_valid_ones():
    with pytest.raises(TypeError, match=r"bitwidth_weight\b.*bitwidth_weights"):
        xnnq.QuantTrainModule(resnet20(), DUMMY, bitwidth_weight=16)


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"bitwidth_weights": 4}, "bitwidth_weights: bitwidth 4"),
        ({"per_channel_q": "some"}, "per_channel_q must be"),
        ({"trim_fraction": 0.5}, "trim_fraction must be"),
        ({"ema_alpha": 0.0}, "ema_alpha must be"),
    ],
)
def test_bad_settings_are_refused_before_tracing(kw, msg):
    with pytest.raises(ValueError, match=msg):
        QuantConfig(**kw)


def test_histogram_tail_is_a_deprecated_alias_of_trim_fraction():
    with pytest.warns(DeprecationWarning, match="trim_fraction"):
        q = xnnq.QuantTrainModule(resnet20(), DUMMY, histogram_tail=1e-3)
    assert q.config.trim_fraction == 1e-3
    assert q.quantizers()["input_q"].observer.tail == 1e-3
    with pytest.raises(TypeError, match="not both"), pytest.warns(DeprecationWarning):
        QuantConfig.from_settings(histogram_tail=1e-3, trim_fraction=1e-3)
