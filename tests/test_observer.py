"""The observer injected into PACT2: RangeTracker (QAT) or HistogramObserver (calibration), one quantizer class."""

import torch

import xnnq
from xnnq.calibrate import HistogramObserver, QuantCalibrateModule
from xnnq.layers import PACT2, RangeTracker
from xnnq.models.cifar_resnet import resnet20

DUMMY = torch.randn(1, 3, 32, 32)


def test_wrappers_differ_only_in_the_observer():
    qat = xnnq.QuantTrainModule(resnet20(), DUMMY)
    cal = QuantCalibrateModule(resnet20(), DUMMY)
    assert all(type(p) is PACT2 for p in cal.quantizers().values())
    assert all(isinstance(p.observer, RangeTracker) for p in qat.quantizers().values())
    assert all(isinstance(p.observer, HistogramObserver) for p in cal.quantizers().values())
    # the same state-dict keys: a state dict moves between the wrappers
    assert qat.state_dict().keys() == cal.state_dict().keys()
    assert cal.quantizers()["layer1.0.relu"].observer.cap is None
    assert cal.quantizers()["input_q"].observer.tail == cal.config.trim_fraction


def test_state_dicts_saved_with_the_old_tracker_name_load():
    torch.manual_seed(0)
    p = PACT2(name="p").train()
    p(torch.randn(64) * 3)
    old = {k.replace("observer.", "tracker."): v for k, v in p.state_dict().items()}
    assert "tracker.max_val" in old
    fresh = PACT2(name="p")
    fresh.load_state_dict(old)  # strict
    assert torch.equal(fresh.observer.max_val, p.observer.max_val) and fresh.observed
    x = torch.randn(32) * 3
    assert torch.equal(fresh.eval()(x), p.eval()(x))


def test_histogram_observer_passes_float_until_settled():
    p = PACT2(
        signed=None, name="c", observer=HistogramObserver(method="max", name="c", sample_size=0)
    ).train()
    x = torch.tensor([-1.0, 0.5, 3.0])
    assert torch.equal(p(x), x) and not p.observed  # float pass-through, nothing decided yet
    assert p.settle_range() == 4.0 and p.observed and p.data_signed is True
    assert p.clip_values() == (-4.0, 4.0)
    assert int(p.observer.num_batches) == 0  # not a running range: QAT started from it re-estimates


def test_a_running_tracker_has_nothing_to_settle():
    p = PACT2(name="p").train()
    p(torch.randn(16))
    before = p.observer.max_val.clone()
    assert p.settle_range() is None and torch.equal(p.observer.max_val, before)
