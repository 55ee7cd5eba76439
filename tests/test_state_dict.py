import pytest
import torch

import xnnq
from xnnq.models.cifar_resnet import resnet20


def _trained_qat(fm):
    q = xnnq.QuantTrainModule(fm, torch.randn(1, 3, 32, 32)).train()
    opt = torch.optim.SGD(q.parameters(), lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        q(torch.randn(8, 3, 32, 32)).square().mean().backward()
        opt.step()
    xnnq.utils.freeze_bn(q)
    xnnq.layers.freeze_quant_range(q)
    return q


def test_round_trip_into_fresh_wrapper_and_test_module():
    fm = resnet20()
    q = _trained_qat(fm).eval()
    sd = q.state_dict()
    x = torch.randn(4, 3, 32, 32)
    fresh = xnnq.QuantTrainModule(resnet20(), torch.randn(1, 3, 32, 32))
    fresh.load_state_dict(sd)
    fresh.eval()
    assert torch.equal(fresh(x), q(x))
    assert fresh.bn_frozen and all(p.frozen for p in fresh.quantizers().values())
    t = xnnq.QuantTestModule(resnet20(), torch.randn(1, 3, 32, 32))
    t.load_state_dict(sd)
    t.train()  # stays in eval
    assert not t.training and torch.equal(t(x), q(x))


def test_freeze_bn_survives_train_and_unfreeze_restores():
    q = xnnq.QuantTrainModule(resnet20(), torch.randn(1, 3, 32, 32)).train()
    xnnq.utils.freeze_bn(q)
    q.train()
    bns = [m for m in q.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(b.training for b in bns)
    rm = bns[0].running_mean.clone()
    q(torch.randn(4, 3, 32, 32))
    assert torch.equal(bns[0].running_mean, rm)  # running statistics kept
    xnnq.utils.unfreeze_bn(q)
    assert all(b.training for b in bns)
    q(torch.randn(4, 3, 32, 32))
    assert not torch.equal(bns[0].running_mean, rm)


def test_freeze_bn_plain_model():
    fm = resnet20().train()
    assert xnnq.utils.freeze_bn(fm) == 19
    assert not any(m.training for m in fm.modules() if isinstance(m, torch.nn.BatchNorm2d))
    xnnq.utils.unfreeze_bn(fm)
    assert all(m.training for m in fm.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_freeze_schedule_by_epoch():
    q = xnnq.QuantTrainModule(resnet20(), torch.randn(1, 3, 32, 32)).train()
    states = [
        xnnq.utils.apply_freeze_schedule(q, e, freeze_bn_epoch=2, freeze_range_epoch=3) for e in range(4)
    ]
    assert [s["bn_frozen"] for s in states] == [False, False, True, True]
    assert [s["range_frozen"] for s in states] == [False, False, False, True]
    assert q.bn_frozen and all(p.frozen for p in q.quantizers().values())
    xnnq.utils.apply_freeze_schedule(q, 0, freeze_bn_epoch=2, freeze_range_epoch=3)  # resumed earlier
    assert not q.bn_frozen and not any(p.frozen for p in q.quantizers().values())


def test_state_dict_from_other_bitwidths_is_refused():
    sd = xnnq.QuantTrainModule(resnet20(), torch.randn(1, 3, 32, 32)).state_dict()
    other = xnnq.QuantTrainModule(resnet20(), torch.randn(1, 3, 32, 32), bitwidth_overrides={"last": 16})
    with pytest.raises(ValueError, match="linear.*8-bit per-tensor weights, this model has 16-bit"):
        other.load_state_dict(sd)
