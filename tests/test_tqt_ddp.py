"""Learned thresholds under DistributedDataParallel: DDP all-reduces their gradients like any parameter's.

Two CPU processes (gloo, loopback) train a tiny conv net with ``range_learning="tqt"`` (thresholds initialised
from the all-reduced statistics of the first batch, then trained by Adam; weights by SGD), through a freeze of
the ranges half-way (DDP with its default ``find_unused_parameters=False``: frozen thresholds stay in the
graph with a zero gradient). Each rank saves its state; the parent compares the ranks with each other and with
one process on the concatenated batches (BatchNorm frozen, see tests/test_ddp.py for why).
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
from xnnq.utils import freeze_bn

from conftest import init_gloo

WORLD, STEPS, PER_RANK = 2, 4, 4

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with the gloo backend is not available in this build",
)


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def global_batches():
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(STEPS):
        x = torch.randn(WORLD * PER_RANK, 3, 8, 8, generator=g)
        x[PER_RANK:] *= 3.0  # rank 1 sees the larger values
        out.append((x, torch.randint(0, 4, (WORLD * PER_RANK,), generator=g)))
    return out


def make() -> xnnq.QuantTrainModule:
    q = xnnq.QuantTrainModule(
        tiny_net(), torch.randn(1, 3, 8, 8), trim_fraction=0.0, range_learning="tqt", range_init_batches=1
    ).train()
    freeze_bn(q)
    return q


def train(model: nn.Module, q: xnnq.QuantTrainModule, batches) -> None:
    opt = torch.optim.SGD(q.non_range_parameters(), lr=0.05, momentum=0.9)
    opt_th = torch.optim.Adam(q.range_parameters(), lr=0.1)
    for i, (x, y) in enumerate(batches):
        if i == STEPS // 2:
            xnnq.layers.freeze_quant_range(q)
        opt.zero_grad()
        opt_th.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt_th.step()


def shard(batches, rank: int):
    return [
        (x[rank * PER_RANK : (rank + 1) * PER_RANK], y[rank * PER_RANK : (rank + 1) * PER_RANK])
        for x, y in batches
    ]


def _worker(rank: int, port: int, outdir: str) -> None:
    init_gloo(rank, WORLD, port)
    try:
        q = make()
        data = shard(global_batches(), rank)
        # one step before freezing, to record the all-reduced threshold gradients of this rank
        train(DDP(q), q, data)
        q.eval()
        with torch.no_grad():
            out = q(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(7)))
        state = {k: v for k, v in q.state_dict().items() if isinstance(v, torch.Tensor)}
        torch.save({"state": state, "out": out}, Path(outdir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        outdir = tmp_path_factory.mktemp("tqt_ddp")
        mp.spawn(_worker, args=(_free_port(), str(outdir)), nprocs=WORLD, join=True)
        return [torch.load(outdir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    finally:
        torch.set_num_threads(n)


def test_ranks_hold_identical_thresholds_and_weights(ranks):
    r0, r1 = ranks
    assert r0["state"].keys() == r1["state"].keys()
    assert any(k.endswith("learned_range.log2_t") for k in r0["state"])
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), f"{k} differs between ranks"
    assert torch.equal(r0["out"], r1["out"])


def test_ddp_matches_one_process_on_the_concatenated_batch(ranks):
    """Thresholds learned under DDP equal (to float rounding: per-rank gradient means are averaged) those of
    one process on all the data; the first batch's initialisation is all-reduced, so the input threshold
    starts from the global range (rank 1's larger values), not rank 0's."""
    q = make()
    train(q, q, global_batches())
    got = ranks[0]["state"]
    for k, v in q.state_dict().items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-5, msg=k)
    name = next(a.name for a in q.plan.acts if a.reason == "input")
    x0 = global_batches()[0][0]
    # started at log2 of the global max (tail 0) and moved by at most 2 Adam steps of 0.1 before the freeze
    start = torch.log2(x0.abs().max())
    frozen = got[f"module.{name}.learned_range.frozen_log2_t"]
    assert abs(float(frozen - start)) <= 0.2 + 1e-6
    assert frozen > torch.log2(x0[:PER_RANK].abs().max()) + 0.5  # not rank 0's own range
