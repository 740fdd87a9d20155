"""In-place ops after a layer whose output is a view of a whole tensor (a Linear's
``addmm`` viewed back on tokens, an embedding's lookup, sequence-first attention): autograd
rebuilds the view's history, and the gradient is read at the tensor it views. Where that
cannot be done, an error, never a missed gradient."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import indigrad

D = torch.float64


class Tokens(nn.Module):
    """An embedding, Linear layers on tokens, sequence-first attention and batch-first
    attention (whose output is a transposed view), each output changed in place right
    after the layer."""

    def __init__(self, vocab=11, d=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.fc = nn.Linear(d, d)
        self.attn = nn.MultiheadAttention(d, 2)  # sequence-first
        self.attn2 = nn.MultiheadAttention(d, 2, batch_first=True)  # its output transposed
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Linear(d, 3)

    def forward(self, ids):  # (n, T)
        h = self.emb(ids).mul_(2.0)  # (n, T, d)
        h = self.act(self.fc(h))
        a = self.attn(h.transpose(0, 1), h.transpose(0, 1), h.transpose(0, 1))[0]  # (T, n, d)
        h = torch.tanh_(a).transpose(0, 1)  # (n, T, d)
        h = self.attn2(h, h, h)[0].mul_(0.5)  # (n, T, d), a view of (T, n, d)
        return self.head(h).mean(1)  # (n, 3)


def test_in_place_ops_after_view_outputs():
    torch.manual_seed(0)
    model = Tokens().double().eval()
    ids, y = torch.randint(0, 11, (4, 5)), torch.tensor([0, 2, 1, 1])

    def losses(ids, y):
        return F.cross_entropy(model(ids), y, reduction="none")

    indigrad.testing.check(model, losses, ids, y)


class Sliced(nn.Module):
    """A module returning part of a tensor it computed, changed in place afterwards."""

    def __init__(self, d=4):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, 2 * d, dtype=D))

    def forward(self, x):  # (n, T, 2d)
        return (x * self.w)[..., ::2]  # (n, T, d): not a view of the whole


class Cached(nn.Module):
    """A module whose result reaches the losses through an attribute, not its return."""

    def __init__(self, d=4):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, d, dtype=D))

    def forward(self, x):
        self.cache = x * self.w
        return self.cache + 1.0


class Outer(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out = self.inner(x)
        if isinstance(self.inner, Sliced):
            return torch.relu_(out).square().sum((1, 2))
        return self.inner.cache.square().sum((1, 2))  # not `out`


@pytest.mark.parametrize("inner", [Sliced, Cached])
def test_outputs_bypassed_are_refused(inner):
    model = Outer(inner())
    x = torch.randn(3, 5, 8 if inner is Sliced else 4, dtype=D)
    for quantity in ("grads", "norms", "clip_"):
        with indigrad.capture(model) as cap, pytest.raises(RuntimeError, match="not through"):
            args = (1.0,) if quantity == "clip_" else ()
            getattr(cap, quantity)(model(x), *args)


class Both(nn.Module):
    """Returns a tensor and a view of all of it; only the first is used (the generic rule
    re-runs it: a product is not read from the graph)."""

    def __init__(self, d=4):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, d * d, dtype=D).reshape(d, d))

    def forward(self, x):  # (n, T, d)
        h = x @ self.w
        return h, h.view(h.shape[0], -1)


def test_an_unused_view_output_is_not_read_at_its_base():
    model = Outer(Both())
    model.forward = lambda x: model.inner(x)[0].tanh().sum((1, 2))
    x = torch.randn(3, 5, 4, dtype=D)
    indigrad.testing.check(model, model, x)


def test_a_view_taken_from_a_gradient_inside_a_larger_storage():
    from indigrad._graph import View

    base = torch.arange(24.0).reshape(4, 6)
    view = View(base.t().shape, base.t().stride(), 0)  # the output: the base transposed
    inside = torch.cat([torch.zeros(5), base.flatten()])[5:].view(4, 6)  # offset 5
    assert torch.equal(view.of(inside), base.t())
    both = torch.stack([base, base + 1])  # (n, 4, 6)
    assert torch.equal(view.of(both, batched=True), torch.stack([base.t(), base.t() + 1]))
