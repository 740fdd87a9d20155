"""The Triton outer-product kernel (``indigrad._outer``) that writes a Linear layer's
per-example weight gradients on CUDA. Without a GPU it runs under Triton's interpreter,
where Triton is installed (PyTorch's CUDA builds ship it; the CPU builds do not, and
these tests are then skipped: ``benchmarks/gpu_check.py`` checks the kernel on a device)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import indigrad
from indigrad import _outer

# Triton reads TRITON_INTERPRET when it compiles a kernel's definition: a fresh process
SCRIPT = textwrap.dedent(
    """
    import torch
    from torch import nn
    import indigrad
    from indigrad import _outer, testing
    _outer.DEVICES.add("cpu")
    taken = []
    real = _outer.outer
    def spy(L, R, out):
        taken.append(real(L, R, out))
        return taken[-1]
    _outer.outer = spy
    g = torch.Generator().manual_seed(0)
    # tile edges: sizes that are not multiples of the tile, one example, float32 and 64
    for n, a, b, dtype in [(3, 37, 300, torch.float32), (1, 5, 7, torch.float64),
                           (2, 64, 512, torch.float32)]:
        L = torch.randn(n, a, generator=g, dtype=dtype)
        R = torch.randn(n, b, generator=g, dtype=dtype)
        W = torch.full((n, a, b), float("nan"), dtype=dtype)
        assert real(L, R, W)
        assert torch.equal(W, L[:, :, None] * R[:, None, :]), (n, a, b, dtype)
    # through the Linear rule, against the float64 loop reference
    model = nn.Sequential(nn.Linear(9, 40), nn.Tanh(), nn.Linear(40, 3)).double()
    x = torch.randn(5, 9, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=g)
    loss = lambda x, y: nn.functional.cross_entropy(model(x), y, reduction="none")
    testing.check(model, loss, x, y)
    assert taken and all(taken)
    print("ok")
    """
)


def test_outer_kernel_under_the_interpreter_writes_the_products():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_outer_declines_what_it_does_not_cover():
    L, R = torch.randn(2, 3), torch.randn(2, 4)
    assert not _outer.outer(L, R, torch.empty(2, 3, 4))  # CPU


def test_a_kernel_that_fails_to_launch_falls_back_to_the_same_gradients(monkeypatch):
    # a GPU where Triton cannot compile: one warning, then torch's own product, same numbers
    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("no compiler for this device")

            return launch

    class FakeTriton:
        @staticmethod
        def cdiv(x, y):
            return -(-x // y)

    monkeypatch.setattr(_outer, "_kernel", lambda: (FakeTriton, Broken()))
    monkeypatch.setattr(_outer, "_failed", [])
    monkeypatch.setattr(_outer, "DEVICES", {"cpu"})
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    model = model.double()
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.randint(0, 2, (3,))
    loss = lambda x, y: torch.nn.functional.cross_entropy(model(x), y, reduction="none")  # noqa: E731
    with pytest.warns(RuntimeWarning, match="Triton outer-product kernel failed"):
        indigrad.testing.check(model, loss, x, y)
    assert len(_outer._failed) == 1  # tried once, then not again
