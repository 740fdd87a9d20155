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
