"""Ghost norms where the positions' contributions cancel (``indigrad/rules/_ghost.py``).

Each model takes, per example, inputs at two positions whose contributions to a gradient
nearly cancel: ``a`` and ``-(1 - δ) a`` with the same output gradient. The Grams' sum is
then a small difference of large terms. In float32 the norm must never come out short of
the true one (computed in float64 by the loop), nor NaN, so that no example escapes its
clipping; where nothing cancels, the guard changes nothing.
"""

import copy

import pytest
import torch
from torch import Tensor, nn

import indigrad
from indigrad.rules import _ghost
from indigrad.testing import loop_grads, norms_of

N, D = 6, 32


def _cancelling(delta: float, *shape: int) -> Tensor:
    """``(N, 2, *shape)``: per example a random ``a``, then ``-(1 - δ) a``."""
    g = torch.Generator().manual_seed(0)
    a = 1e3 * torch.randn(N, 1, *shape, generator=g)
    return torch.cat([a, -(1 - delta) * a], 1)


class Tokens(nn.Module):
    """A Linear over two tokens; the loss is the sum of both tokens' outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D, bias=False)

    def forward(self, x: Tensor) -> Tensor:  # x (n, 2, D)
        return self.lin(x).sum(1)  # (n, D): one output gradient for both tokens


class Positions(nn.Module):
    """A 1×1 conv over two positions, summed over them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(D, D, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:  # x (n, 2, D)
        return self.conv(x.transpose(1, 2)).sum(2)  # (n, D)


class Twice(nn.Module):
    """One Linear applied to each token: a parameter of two uses (``rules/tied.py``)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D, bias=False)

    def forward(self, x: Tensor) -> Tensor:  # x (n, 2, D)
        return self.lin(x[:, 0]) + self.lin(x[:, 1])  # (n, D)


class Lookups(nn.Module):
    """Two lookups of the same row, their outputs weighted 1 and -(1 - δ)."""

    def __init__(self, delta: float) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, D)
        self.delta = delta

    def forward(self, ids: Tensor) -> Tensor:  # ids (n, 2)
        e = self.emb(ids)  # (n, 2, D)
        return 1e3 * (e[:, 0] - (1 - self.delta) * e[:, 1])  # (n, D)


def _problem(kind: str, delta: float):
    torch.manual_seed(0)
    v = torch.randn(D)
    if kind == "embedding":
        model: nn.Module = Lookups(delta)
        x = torch.randint(0, 10, (N, 1)).expand(N, 2).contiguous()  # one row, twice
    else:
        model = {"linear": Tokens, "conv": Positions, "tied": Twice}[kind]()
        x = _cancelling(delta, D)
    return model, (lambda m: lambda x: m(x) @ v.to(m(x).dtype)), x


@pytest.mark.parametrize("kind", ["linear", "conv", "tied", "embedding"])
@pytest.mark.parametrize("delta", [1e-2, 1e-4, 1e-6])
def test_no_norm_short_of_the_true_one(kind, delta):
    model, losses_of, x = _problem(kind, delta)
    exact = copy.deepcopy(model).double()
    true = norms_of(loop_grads(exact, losses_of(exact), x if kind == "embedding" else x.double()))
    with indigrad.capture(model) as cap:
        per_example = cap.backward(losses_of(model)(x))
        norms = per_example.norms()
        per_example.clip_(1.0)
    assert torch.isfinite(norms).all()
    assert (norms.double() >= true * (1 - 1e-3)).all(), (norms, true)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("kind", ["linear", "conv", "tied", "embedding"])
def test_nothing_raised_where_nothing_cancels(kind):
    model, losses_of, _ = _problem(kind, 0.5)
    x = (
        torch.randint(0, 10, (N, 2))
        if kind == "embedding"
        else torch.randn(N, 2, D, generator=torch.Generator().manual_seed(1))
    )
    exact = copy.deepcopy(model).double()
    true = norms_of(loop_grads(exact, losses_of(exact), x if kind == "embedding" else x.double()))
    with indigrad.capture(model) as cap:
        norms = cap.norms(losses_of(model)(x))
    torch.testing.assert_close(norms.double(), true, rtol=1e-5, atol=0)


def test_the_scale_is_that_of_the_grams_dtype():
    assert _ghost.scale(torch.float64, 4, 4, 2) < _ghost.scale(torch.float32, 4, 4, 2) < 1e-3
    assert _ghost.scale(torch.bfloat16, 4, 4, 2) is None
