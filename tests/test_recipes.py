"""xnnq.recipes.qat_finetune: the recipe's steps, freezing points and schedule, generic losses, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import xnnq
from xnnq.data import Batches
from xnnq.layers import PACT2, freeze_quant_range
from xnnq.recipes import qat_finetune, to_device
from xnnq.utils import freeze_bn

from conftest import observe, tiny_convnet

DUMMY = torch.randn(1, 3, 8, 8)


def images(n: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 8x8 images of 4 classes: class c < 3 has a bright colour channel c, class 3 none."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randint(0, 100, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    lit = y < 3
    x[lit.nonzero().flatten(), y[lit]] += 120
    return x, y


def wrapper(seed: int = 0) -> xnnq.QuantTrainModule:
    torch.manual_seed(seed)
    return xnnq.QuantTrainModule(tiny_convnet(num_classes=4), DUMMY)


def reference_loop(q, x, y, *, steps: int, lr: float, batch_size: int, seed: int) -> nn.Module:
    """The recipe written out by hand: BN frozen at step 0, ranges frozen at steps // 2, SGD Nesterov with
    weight decay 5e-4 and a cosine schedule over the steps, batches re-drawn each pass from one generator."""
    q.train()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(q.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    step = 0
    while step < steps:
        for xb, yb in Batches(x, y, batch_size, shuffle=True, train_augment=True, generator=gen):
            if step == 0:
                freeze_bn(q)
            if step == steps // 2:
                freeze_quant_range(q)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(q(xb), yb).backward()
            opt.step()
            sched.step()
            step += 1
            if step >= steps:
                break
    return q.eval()


def test_same_numbers_as_the_written_out_recipe():
    """Several passes over the data (1.5 epochs): bit-identical weights, ranges and BN state."""
    x, y = images()
    ref = reference_loop(wrapper(), x, y, steps=9, lr=5e-3, batch_size=16, seed=3)
    train = Batches(x, y, 16, shuffle=True, train_augment=True, generator=torch.Generator().manual_seed(3))
    got = qat_finetune(wrapper(), train, epochs=1.5, lr=5e-3, progress=False)
    assert len(train) == 6 and not got.training
    ref_sd, got_sd = ref.state_dict(), got.state_dict()
    assert ref_sd.keys() == got_sd.keys()
    for k, v in ref_sd.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, got_sd[k]), k
    # and training did something: the weights moved away from the initial ones
    init = wrapper().state_dict()
    assert not torch.equal(init["module.0.weight"], got_sd["module.0.weight"])


@pytest.mark.parametrize(("bn_at", "range_at", "steps"), [(0.0, 0.5, 8), (0.25, 0.75, 8), (None, None, 5)])
def test_freezing_happens_at_the_given_step(bn_at, range_at, steps):
    """BN and the ranges freeze exactly at step int(fraction * steps) (observed inside the loss call)."""
    x, y = images(64)
    q = wrapper()
    seen: list[tuple[bool, bool, bool]] = []

    def loss_fn(out, target):
        acts = [m for m in q.modules() if isinstance(m, PACT2)]
        bns = [m for m in q.modules() if isinstance(m, nn.BatchNorm2d)]
        seen.append((q.bn_frozen, all(not b.training for b in bns), all(a.frozen for a in acts)))
        return F.cross_entropy(out, target)

    qat_finetune(
        q,
        Batches(x, y, 16),
        steps=steps,
        loss_fn=loss_fn,
        freeze_bn_at=bn_at,
        freeze_range_at=range_at,
        progress=False,
    )
    assert len(seen) == steps
    for i, (flag, bn_eval, ranges_frozen) in enumerate(seen):
        bn_expected = bn_at is not None and i >= int(bn_at * steps)
        range_expected = range_at is not None and i >= int(range_at * steps)
        assert flag == bn_eval == bn_expected, i
        assert ranges_frozen == range_expected, i


@pytest.mark.parametrize("steps", [1, 2])
def test_a_run_too_short_for_its_freeze_fraction_still_observes_the_ranges(steps):
    """int(0.5 * 1) = 0 would freeze the ranges before any batch: they freeze after the first one instead,
    and the wrapper evaluates (it used to fail: no range observed)."""
    x, y = images(32)
    q = qat_finetune(wrapper(), Batches(x, y, 16), steps=steps, freeze_range_at=0.3, progress=False)
    assert all(a.observed for a in q.modules() if isinstance(a, PACT2))
    assert torch.isfinite(q(x[:4])).all()
    assert all(a.frozen for a in q.modules() if isinstance(a, PACT2)) == (steps == 2)


def test_cosine_and_constant_schedules_and_a_given_optimizer():
    x, y = images(64)
    lrs: list[float] = []

    def record(opt):
        def loss_fn(out, target):
            lrs.append(opt.param_groups[0]["lr"])
            return F.cross_entropy(out, target)

        return loss_fn

    q = wrapper()
    opt = torch.optim.SGD(q.parameters(), lr=0.01, momentum=0.9)
    qat_finetune(
        q,
        Batches(x, y, 16),
        steps=4,
        optimizer=opt,
        lr_schedule="constant",
        loss_fn=record(opt),
        progress=False,
    )
    assert lrs == [0.01] * 4
    lrs.clear()
    q = wrapper()
    opt = torch.optim.Adam(q.parameters(), lr=0.02)
    qat_finetune(q, Batches(x, y, 16), steps=4, optimizer=opt, loss_fn=record(opt), progress=False)
    assert lrs[0] == pytest.approx(0.02) and lrs[2] == pytest.approx(0.01)  # cosine: half-way is half
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] > 0


def test_generic_targets_and_loss():
    """A task whose targets are dicts of tensors (detection-like) and whose loss is the caller's."""

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = tiny_convnet(num_classes=6)

        def forward(self, x):
            out = self.body(x)
            return out[:, :4], out[:, 4:]

    x, y = images(48)
    batches = [(xb, {"label": yb, "box": torch.rand(len(yb), 2)}) for xb, yb in Batches(x, y, 16)]
    calls = []

    def loss_fn(outputs, targets):
        logits, boxes = outputs
        calls.append(sorted(targets))
        return F.cross_entropy(logits, targets["label"]) + F.l1_loss(boxes, targets["box"])

    torch.manual_seed(0)
    q = xnnq.QuantTrainModule(TwoHeads(), DUMMY)
    before = copy.deepcopy(q.state_dict())
    out = qat_finetune(q, batches, epochs=2, loss_fn=loss_fn, lr=1e-2, progress=False)
    assert out is q and not q.training
    assert len(calls) == 6 and calls[0] == ["box", "label"]  # 3 batches x 2 epochs
    assert any(
        not torch.equal(v, q.state_dict()[k]) for k, v in before.items() if isinstance(v, torch.Tensor)
    )


def test_qat_improves_on_the_ranges_only_model():
    """A learnable toy problem: from an untrained net, QAT alone fits the training data."""
    x, y = images(256)
    torch.manual_seed(0)
    float_model = tiny_convnet(num_classes=4)

    def accuracy(m):
        with torch.no_grad():
            return sum(int((m(xb).argmax(1) == yb).sum()) for xb, yb in Batches(x, y, 64)) / len(y)

    ranges_only = observe(xnnq.QuantTrainModule(float_model, DUMMY), (xb for xb, _ in Batches(x, y, 64)))
    assert accuracy(ranges_only) < 0.5  # an untrained net: near chance (0.25)
    before = copy.deepcopy(float_model.state_dict())
    q = xnnq.QuantTrainModule(float_model, DUMMY)
    q = qat_finetune(
        q,
        Batches(x, y, 32, shuffle=True, generator=torch.Generator().manual_seed(0)),
        epochs=6,
        lr=0.05,
        freeze_bn_at=None,
        progress=False,
    )
    assert accuracy(q) >= 0.9
    for k, v in float_model.state_dict().items():  # the user's model is never modified
        assert torch.equal(v, before[k]), k


def tqt_run(ckpt, *, fail_at: int | None = None) -> xnnq.QuantTrainModule:
    """Learned thresholds (their own Adam beside the weights' SGD), dropout (the global RNG), 1.5 epochs of
    shuffled augmented batches; ``fail_at``: the loss raises at that step (a killed run)."""
    x, y = images()
    torch.manual_seed(0)
    q = xnnq.QuantTrainModule(
        tiny_convnet(num_classes=4, dropout=0.3), DUMMY, range_learning="tqt", range_init_batches=3
    )
    opts = [
        torch.optim.SGD(q.non_range_parameters(), lr=5e-3, momentum=0.9, nesterov=True, weight_decay=5e-4),
        torch.optim.Adam(q.range_parameters(), lr=1e-2),
    ]
    calls = []

    def loss_fn(out, target):
        if len(calls) == fail_at:
            raise KeyboardInterrupt
        calls.append(1)
        return F.cross_entropy(out, target)

    train = Batches(x, y, 16, shuffle=True, train_augment=True, generator=torch.Generator().manual_seed(3))
    return qat_finetune(
        q,
        train,
        steps=9,
        optimizer=opts,
        loss_fn=loss_fn,
        checkpoint=ckpt,
        checkpoint_every=2,
        progress=False,
    )


@pytest.mark.parametrize("fail_at", [3, 7])
def test_checkpoint_resume_with_two_optimizers_is_bit_identical(tmp_path, fail_at):
    """Killed after a checkpoint (within the thresholds' initialising batches, or at an epoch boundary past
    the range freeze), a fresh run with the same seeds resumes and ends bit-identical to an uninterrupted
    run; the finished run deletes its checkpoint."""
    ref = tqt_run(tmp_path / "ref.pt")
    assert not (tmp_path / "ref.pt").exists()
    ckpt = tmp_path / "ckpt.pt"
    with pytest.raises(KeyboardInterrupt):
        tqt_run(ckpt, fail_at=fail_at)
    saved = torch.load(ckpt, weights_only=True)
    assert saved["step"] == fail_at - fail_at % 2 and saved["cpu_seconds"] >= 0
    got = tqt_run(ckpt)
    assert not ckpt.exists()
    ref_sd, got_sd = ref.state_dict(), got.state_dict()
    assert ref_sd.keys() == got_sd.keys() and any("log2_t" in k for k in ref_sd)
    for k, v in ref_sd.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, got_sd[k]), k
        else:
            assert v == got_sd[k], k
    init = xnnq.QuantTrainModule(tiny_convnet(num_classes=4), DUMMY, range_learning="tqt").state_dict()
    assert not torch.equal(init["module.0.weight"], got_sd["module.0.weight"])


def test_checkpoint_of_another_run_is_refused(tmp_path):
    x, y = images(64)
    ckpt = tmp_path / "ckpt.pt"
    calls = []

    def dies_at_step_2(out, target):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return F.cross_entropy(out, target)

    with pytest.raises(KeyboardInterrupt):
        kw = {"checkpoint": ckpt, "checkpoint_every": 1, "progress": False}
        qat_finetune(wrapper(), Batches(x, y, 16), steps=4, loss_fn=dies_at_step_2, **kw)
    with pytest.raises(ValueError, match="checkpoint of a run of 4 steps"):
        qat_finetune(wrapper(), Batches(x, y, 16), steps=5, checkpoint=ckpt, progress=False)
    with pytest.raises(ValueError, match="checkpoint_every"):
        qat_finetune(wrapper(), Batches(x, y, 16), steps=4, checkpoint=ckpt, checkpoint_every=0)


def test_to_device_moves_nested_tensors():
    t = torch.zeros(2)
    moved = to_device({"a": [t, (t, 3)], "b": "text"}, torch.device("cpu"))
    assert moved["b"] == "text" and moved["a"][1][1] == 3 and isinstance(moved["a"][1], tuple)
    assert torch.equal(moved["a"][0], t)


def test_bad_input_is_named():
    x, y = images(32)
    with pytest.raises(
        TypeError, match=r"no activation quantizer.*xnnq.QuantTrainModule\(model, dummy_input\)"
    ):
        qat_finetune(tiny_convnet(), Batches(x, y, 16), progress=False)
    with pytest.raises(TypeError, match="pass steps="):
        qat_finetune(wrapper(), (b for b in Batches(x, y, 16)), progress=False)
    with pytest.raises(ValueError, match="yielded no batch after 2 of 5 steps"):
        qat_finetune(wrapper(), (b for b in Batches(x, y, 16)), steps=5, progress=False)
    q = wrapper()
    with pytest.raises(ValueError, match="either optimizer= or lr="):
        qat_finetune(q, Batches(x, y, 16), optimizer=torch.optim.SGD(q.parameters(), lr=0.1), lr=0.1)
    with pytest.raises(ValueError, match="freeze_range_at is a fraction"):
        qat_finetune(q, Batches(x, y, 16), freeze_range_at=2)
    with pytest.raises(ValueError, match="lr_schedule"):
        qat_finetune(q, Batches(x, y, 16), lr_schedule="step")
    with pytest.raises(ValueError, match="epochs must be > 0"):
        qat_finetune(q, Batches(x, y, 16), epochs=0)


def test_default_optimizers_give_learned_thresholds_their_own_adam():
    """With range_learning="tqt" the default recipe trains the log2 thresholds with Adam at range_lr (its first
    step moves each threshold by range_lr, whatever its gradient's size) and no weight decay, and the weights
    with the SGD alone, as the recipe written out by hand does."""
    x, y = images(32)
    torch.manual_seed(0)
    q = xnnq.QuantTrainModule(tiny_convnet(num_classes=4), DUMMY, range_learning="tqt", range_init_batches=1)
    qat_finetune(q, Batches(x, y, 32), steps=1, range_lr=0.03, freeze_range_at=None, progress=False)
    moved = [(m.log2_t - m.anchor).abs() for m in q.learned_ranges().values()]
    assert len(moved) >= 4
    for d in moved:
        torch.testing.assert_close(d, torch.full_like(d, 0.03), rtol=0.05, atol=0.0)  # Adam: eps aside
    torch.manual_seed(0)
    ref = xnnq.QuantTrainModule(
        tiny_convnet(num_classes=4), DUMMY, range_learning="tqt", range_init_batches=1
    )
    opts = [
        torch.optim.SGD(ref.non_range_parameters(), lr=1e-4, momentum=0.9, nesterov=True, weight_decay=5e-4),
        torch.optim.Adam(ref.range_parameters(), lr=0.03),
    ]
    qat_finetune(ref, Batches(x, y, 32), steps=1, optimizer=opts, freeze_range_at=None, progress=False)
    for (k, a), b in zip(q.state_dict().items(), ref.state_dict().values()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="range_lr= trains learned thresholds"):
        qat_finetune(wrapper(), Batches(x, y, 32), steps=1, range_lr=0.01, progress=False)
    with pytest.raises(ValueError, match="either optimizer= or lr=/weight_decay=/range_lr="):
        qat_finetune(ref, Batches(x, y, 32), steps=1, optimizer=opts, range_lr=0.01, progress=False)
