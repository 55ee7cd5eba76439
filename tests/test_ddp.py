"""Multi-process QAT with DistributedDataParallel: every rank quantizes with the same ranges.

Two CPU processes (gloo, loopback) train a tiny conv net with :class:`xnnq.QuantTrainModule` under DDP.
All scenarios run in one ``torch.multiprocessing.spawn`` (process start-up dominates the cost); each
rank saves its state dict and the parent process compares them.

Tolerance of the "one process on the concatenated batch" comparison: with ``trim_fraction=0`` the
all-reduced MIN of minima / MAX of maxima *is* the extreme of the concatenated batch, so the input
quantizer's range is bit-identical. Deeper ranges and the weights agree to float rounding only: the
convolutions of a 4-image and an 8-image batch sum in a different order, and DDP averages two
per-rank gradient means instead of taking one mean. (With ``trim_fraction > 0`` the reduce of per-rank
trimmed extremes is close to, not equal to, the trimmed extreme of the concatenated batch.)
BatchNorm is frozen in that comparison: in training mode each rank normalizes with its own batch
statistics (``SyncBatchNorm`` needs a GPU), which a single process on the whole batch cannot reproduce.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import xnnq
from xnnq.calibrate import QuantCalibrateModule
from xnnq.utils import freeze_bn

from conftest import init_gloo, observe, quantizer_ranges, tiny_convnet

WORLD = 2
STEPS = 4
PER_RANK = 4
NAN_STEP = 2

pytestmark = [
    pytest.mark.slow,  # spawns worker processes
    pytest.mark.skipif(
        not dist.is_available() or not dist.is_gloo_available(),
        reason="torch.distributed with the gloo backend is not available in this build",
    ),
]


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return tiny_convnet(num_classes=4)


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """STEPS batches of WORLD*PER_RANK images; rank 1's half has the larger values at every step, so a
    range that only reflected rank 0 (what DDP's buffer broadcast would give) is visibly wrong."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        x = torch.randn(WORLD * PER_RANK, 3, 8, 8, generator=g)
        x[PER_RANK:] *= 3.0
        out.append((x, torch.randint(0, 4, (WORLD * PER_RANK,), generator=g)))
    return out


def make_qat(frozen_bn: bool) -> xnnq.QuantTrainModule:
    q = xnnq.QuantTrainModule(tiny_net(), torch.randn(1, 3, 8, 8), trim_fraction=0.0)
    q.train()
    if frozen_bn:
        freeze_bn(q)
    return q


def train(model: nn.Module, batches, lr: float = 0.05) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def input_quantizer(q: xnnq.QuantTrainModule) -> str:
    return next(a.name for a in q.plan.acts if a.reason == "input")


def ranges(q: xnnq.QuantTrainModule) -> dict[str, torch.Tensor]:
    return {n: torch.stack(lo_hi) for n, lo_hi in quantizer_ranges(q).items()}


def shard(batches, rank: int):
    return [
        (x[rank * PER_RANK : (rank + 1) * PER_RANK], y[rank * PER_RANK : (rank + 1) * PER_RANK])
        for x, y in batches
    ]


SCENARIOS = {  # name: (BN frozen, DDP forward_sync_buffers (formerly broadcast_buffers))
    "bn_train_broadcast": (False, True),
    "bn_train_no_broadcast": (False, False),
    "bn_frozen_broadcast": (True, True),
    "bn_frozen_no_broadcast": (True, False),
}


def calibrate(data) -> dict[str, dict[str, torch.Tensor]]:
    """Post-training calibration of the tiny net on ``data``: its ranges and state."""
    q = observe(QuantCalibrateModule(tiny_net(), torch.randn(1, 3, 8, 8), method="mse"), (x for x, _ in data))
    return {
        "ranges": ranges(q),
        "state": {k: v for k, v in q.state_dict().items() if isinstance(v, torch.Tensor)},
    }


def _worker(rank: int, port: int, outdir: str) -> None:
    init_gloo(rank, WORLD, port)
    try:
        data = shard(global_batches(), rank)
        probe = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(7))
        result: dict = {}
        for name, (frozen_bn, broadcast) in SCENARIOS.items():
            q = make_qat(frozen_bn)
            train(DDP(q, forward_sync_buffers=broadcast), data)
            q.eval()
            with torch.no_grad():
                out = q(probe)
            result[name] = {
                "state": {k: v for k, v in q.state_dict().items() if isinstance(v, torch.Tensor)},
                "ranges": ranges(q),
                "probe_out": out,
            }
        # NaN on rank 1 only, at step NAN_STEP: every rank must stop with the same error, ranges untouched
        q = make_qat(True)
        ddp = DDP(q)
        train(ddp, data[:NAN_STEP])
        before = ranges(q)
        x, y = data[NAN_STEP]
        if rank == 1:
            x = x.clone()
            x[0, 0, 0, 0] = float("nan")
        try:
            ddp(x)
            err = ""
        except FloatingPointError as e:
            err = str(e)
        result["nan"] = {"error": err, "before": before, "after": ranges(q)}
        result["calibration"] = calibrate(data)
        torch.save(result, Path(outdir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """2 shared cores: intra-op threads only contend (4 steps take 1.6 s with 2 threads, 0.26 s with 1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    outdir = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(outdir)), nprocs=WORLD, join=True)
    return [torch.load(outdir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_ranks_hold_identical_ranges_and_weights(ranks, scenario):
    """After STEPS steps every parameter and every quantizer buffer is bit-identical on all ranks.

    With BatchNorm in training mode the running statistics are the exception, as in any DDP training: each
    rank folds in its own batch statistics after the buffer broadcast of the last forward (so evaluate or
    save on one rank, or freeze BN first); with BN frozen everything, and the eval output, is identical.
    """
    r0, r1 = ranks[0][scenario], ranks[1][scenario]
    assert r0["state"].keys() == r1["state"].keys()
    bn_training = not SCENARIOS[scenario][0]
    for k in r0["state"]:
        if bn_training and (k.endswith("running_mean") or k.endswith("running_var")):
            continue
        assert torch.equal(r0["state"][k], r1["state"][k]), f"{scenario}: {k} differs between ranks"
    for k in r0["ranges"]:
        assert torch.equal(r0["ranges"][k], r1["ranges"][k]), (
            f"{scenario}: range of {k} differs between ranks"
        )
    if not bn_training:
        assert torch.equal(r0["probe_out"], r1["probe_out"])
    else:  # the documented exception is real: each rank's last batch statistics
        assert any(
            not torch.equal(r0["state"][k], r1["state"][k]) for k in r0["state"] if k.endswith("running_mean")
        )
    assert all(int(v) > 0 for k, v in r0["state"].items() if k.endswith("observer.num_batches"))


def test_input_range_is_global_not_rank0(ranks):
    """The input quantizer's range is the extreme of both ranks' data (rank 1 holds the larger values),
    exactly (tail 0): a range broadcast from rank 0 would be about 3x too small."""
    batches = global_batches()
    rank0_max = torch.stack([x[:PER_RANK].max() for x, _ in batches]).mean()
    global_max = torch.stack([x.max() for x, _ in batches]).mean()
    got = ranks[0]["bn_frozen_no_broadcast"]["ranges"][input_quantizer(make_qat(True))][1]
    assert torch.allclose(got, global_max, rtol=1e-6)
    assert got > 2 * rank0_max


def test_broadcast_buffers_is_harmless_for_ranges(ranks):
    """With ranges all-reduced, DDP's per-forward buffer broadcast from rank 0 changes nothing."""
    a, b = ranks[0]["bn_frozen_broadcast"], ranks[0]["bn_frozen_no_broadcast"]
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), k


def test_ddp_matches_one_process_on_the_concatenated_batch(ranks):
    q = make_qat(frozen_bn=True)
    train(q, global_batches())
    ref, got = ranges(q), ranks[0]["bn_frozen_no_broadcast"]["ranges"]
    assert ref.keys() == got.keys()
    name = input_quantizer(q)
    assert torch.equal(got[name], ref[name])  # tail 0: MIN/MAX reduce == extreme of the whole batch
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5, msg=f"range of {k}")
    state = ranks[0]["bn_frozen_no_broadcast"]["state"]
    for k, v in q.state_dict().items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            torch.testing.assert_close(state[k], v, rtol=1e-4, atol=1e-5, msg=f"{k}")


def test_nan_on_one_rank_stops_every_rank_with_the_layer_name(ranks):
    """A NaN in rank 1's batch only: both ranks raise FloatingPointError naming the quantizer (no rank runs
    on into a collective the other never joins), and no range is updated with it."""
    name = input_quantizer(make_qat(True))
    for r, res in enumerate(ranks):
        nan = res["nan"]
        assert name in nan["error"] and "NaN or Inf" in nan["error"], f"rank {r}: {nan['error']!r}"
        for k in nan["before"]:
            assert torch.equal(nan["before"][k], nan["after"][k]), f"rank {r}: range of {k} changed"
            assert torch.isfinite(nan["after"][k]).all()


def test_calibration_ranges_are_identical_across_ranks(ranks):
    """Data-parallel calibration: every rank ends with the ranges (and bias corrections) one process gets
    from all the data."""
    r0, r1 = ranks[0]["calibration"], ranks[1]["calibration"]
    ref = calibrate(global_batches())
    for k in ref["ranges"]:
        assert torch.equal(r0["ranges"][k], r1["ranges"][k]), f"calibrated range of {k} differs between ranks"
        assert torch.equal(r0["ranges"][k], ref["ranges"][k]), (
            f"calibrated range of {k} differs from one process"
        )
    for k, v in ref["state"].items():
        assert torch.equal(r0["state"][k], r1["state"][k]), f"calibrated {k} differs between ranks"
        torch.testing.assert_close(
            r0["state"][k], v, rtol=1e-5, atol=1e-7, msg=f"calibrated {k} vs one process"
        )
