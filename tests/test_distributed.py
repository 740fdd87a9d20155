"""DistributedDataParallel on 2 gloo processes (CPU): several clipped steps equal one
process on the union batch, with DDP's averaging convention."""

import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import run_processes
from torch import nn

import indigrad

WORLD, STEPS, N, MAX_NORM, LR = 2, 4, 12, 0.3, 0.5


def _model():
    torch.manual_seed(0)
    sys.path.insert(0, str(Path(__file__).parent))
    from zoo import Scale

    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), Scale(8), nn.Linear(8, 3)).double()


def _batches():
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        yield (
            torch.randn(N, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (N,), generator=g),
        )


def _step(model, x, y, opt):
    with indigrad.capture(model) as cap:
        norms = cap.clip_(F.cross_entropy(model(x), y, reduction="none"), MAX_NORM)
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norms, grads


def _worker(rank, out):
    dist.init_process_group(
        "gloo",
        init_method=f"file://{out}/rendezvous",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    try:
        ddp = nn.parallel.DistributedDataParallel(_model())
        opt = torch.optim.SGD(ddp.parameters(), lr=LR * WORLD)  # DDP averages: (1/W)·Σ
        record = []
        for x, y in _batches():
            shard = slice(rank * N // WORLD, (rank + 1) * N // WORLD)
            norms, grads = _step(ddp, x[shard], y[shard], opt)
            record.append((norms, grads))
        # nothing is left on the DDP model, and DDP's own sync flag is restored
        assert ddp.require_backward_grad_sync
        torch.save(
            {"record": record, "params": [p.detach() for p in ddp.parameters()]}, f"{out}/{rank}.pt"
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_equals_one_process_on_the_union_batch(tmp_path):
    run_processes(_worker, (str(tmp_path),), WORLD)
    single = _model()
    opt = torch.optim.SGD(single.parameters(), lr=LR)
    expected = [_step(single, x, y, opt) for x, y in _batches()]
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(WORLD)]
    for step, (norms, grads) in enumerate(expected):
        got_norms = torch.cat([r["record"][step][0] for r in results])
        torch.testing.assert_close(got_norms, norms)
        for r in results:
            for g_ddp, g in zip(r["record"][step][1], grads, strict=True):
                torch.testing.assert_close(g_ddp * WORLD, g)  # (1/W)·Σ over the union batch
    for r in results:
        for p_ddp, p in zip(r["params"], single.parameters(), strict=True):
            torch.testing.assert_close(p_ddp, p.detach())
