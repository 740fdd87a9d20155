"""Activation checkpointing: a checkpointed region's forward is recomputed in the backward,
and the tensors the rules read from the graph before it (self-attention's products, the
normalisations' statistics) are recomputed when first read. Only the non-reentrant form
keeps the autograd graph that the capture's one backward needs."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_sums_to_batch_gradient
from torch import nn
from torch.utils.checkpoint import checkpoint

import indigrad
from indigrad.rules import attention

D = torch.float64


class Net(nn.Module):
    """Transformer layers and a conv + GroupNorm block, each checkpointed."""

    def __init__(self, d=4, dropout=0.0, reentrant=False):
        super().__init__()
        self.layers = nn.ModuleList(
            [nn.TransformerEncoderLayer(d, 2, 8, dropout, batch_first=True) for _ in range(2)]
        )
        self.conv = nn.Conv1d(d, d, 3, padding=1)
        self.norm = nn.GroupNorm(2, d)
        self.head = nn.Linear(d, 3)
        self.reentrant = reentrant

    def _conv(self, h):  # (n, T, d)
        return self.norm(self.conv(h.transpose(1, 2))).transpose(1, 2)

    def forward(self, x):  # (n, T, d)
        h = x
        for layer in (*self.layers, self._conv):
            h = checkpoint(layer, h, use_reentrant=self.reentrant)
        return self.head(h.mean(1))  # (n, 3)


def _batch(n=3):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 5, 4, dtype=D, generator=g), torch.randint(0, 3, (n,), generator=g)


def _losses(model):
    def losses(x, y):
        return F.cross_entropy(model(x), y, reduction="none")

    return losses


@pytest.fixture
def no_recompute(monkeypatch):
    def forward(mha, inputs):
        raise AssertionError("self-attention recomputed by the rule")

    monkeypatch.setattr(attention, "_forward", forward)


def test_checkpointed_regions_match_the_loop(no_rerun, no_recompute):
    torch.manual_seed(0)
    model = Net().double()
    indigrad.testing.check(model, _losses(model), *_batch())


def test_checkpointed_dropout_is_the_forward_s_own(no_recompute):
    """The recomputation restores the random state, so the dropout masks read from the
    graph are those of the forward: the per-example gradients sum to its batch gradient."""
    torch.manual_seed(0)
    model = Net(dropout=0.3).double().train()
    assert_sums_to_batch_gradient(model, _losses(model), *_batch())


def test_recomputed_regions_record_no_calls():
    """The backward, and the rules reading what the forward saved, re-run the regions'
    forwards: their calls are not recorded (they held activations until the next
    backward, and a second quantity asked of a consumed forward got the wrong error)."""
    torch.manual_seed(0)
    model = Net().double()
    x, y = _batch()
    with indigrad.capture(model) as cap:
        losses = _losses(model)(x, y)
        cap.grads(losses)
        assert cap._calls == []
        with pytest.raises(RuntimeError, match="already consumed"):
            cap.norms(losses)


def test_reentrant_checkpointing_is_refused():
    """The reentrant form runs the region without a graph and hides it behind one node:
    the region's parameters would get no per-example gradient at all."""
    torch.manual_seed(0)
    model = Net(reentrant=True).double()
    x, y = _batch()
    x.requires_grad_(True)  # else the reentrant form returns outputs without a graph
    for quantity in ("grads", "norms", "clip_"):
        with indigrad.capture(model) as cap, pytest.raises(RuntimeError, match="use_reentrant"):
            args = (1.0,) if quantity == "clip_" else ()
            getattr(cap, quantity)(_losses(model)(x, y), *args)
