import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """For modules of many tiny checks: on a shared 2-core machine, intra-op threads only
    add waiting (measured 4× slower with 2 threads under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_rerun(monkeypatch):
    """Fail if the generic rule re-runs a module: the graph-read paths must cover it."""
    from indigrad import quantities

    def rerun(call, n, bd):
        raise AssertionError(f"the generic rule re-ran {call.label}")

    monkeypatch.setattr(quantities, "generic_grads", rerun)


def assert_sums_to_batch_gradient(model, losses, *batch, seed=3):
    """With random draws in the forward (dropout, stochastic depth) the loop reference
    would draw other masks; the per-example gradients of one forward must sum to that
    forward's batch gradient (same seed). Returns the per-example gradients and norms."""
    torch.manual_seed(seed)
    import indigrad

    with indigrad.capture(model) as cap:
        per = cap.backward(losses(*batch))
        grads, norms = per.grads(), per.norms()
    torch.manual_seed(seed)
    losses(*batch).sum().backward()
    for k, p in model.named_parameters():
        expected = torch.zeros_like(p) if p.grad is None else p.grad  # unused: no .grad
        torch.testing.assert_close(grads[k].sum(0), expected, msg=k)
        p.grad = None
    torch.testing.assert_close(norms, indigrad.testing.norms_of(grads))
    return grads, norms


def run_processes(fn, args, nprocs, timeout=180.0):
    """Run ``fn(rank, *args)`` in ``nprocs`` spawned processes; fail (never hang) if they
    do not all finish within ``timeout`` seconds."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.start_processes(
        fn,
        args=args,
        nprocs=nprocs,
        join=False,
        start_method="spawn",  # fork deadlocks gloo in a parent that has used torch threads
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the {nprocs} processes did not finish within {timeout:.0f} s")
