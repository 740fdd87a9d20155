"""Parameters a module applies itself that belong to modules inside it (Swin's attention
calls ``F.linear`` with its ``qkv`` child's weight): the innermost module around the use
without a rule takes them, and the generic rule their gradients, unless that would count
a use twice."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import indigrad

D = torch.float64


class Applies(nn.Module):
    """Owns a scale (read from the graph) and applies its child's weight itself."""

    def __init__(self, d=4, how="functional"):
        super().__init__()
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, d, dtype=D))
        self.fc = nn.Linear(d, d).double()
        self.how = how

    def forward(self, x):  # (n, T, d)
        if self.how == "functional":
            h = F.linear(x, self.fc.weight, self.fc.bias)
        elif self.how == "forward":  # skips the hooks: no call of fc is recorded
            h = self.fc.forward(x)
        elif self.how == "both":  # fc's own call and a use of its weight beside it
            h = self.fc(x) + F.linear(x.flip(1), self.fc.weight)
        else:  # fc is not used here
            h = x
        return torch.tanh(h) * self.gamma


class Net(nn.Module):
    def __init__(self, body):
        super().__init__()
        self.body = body
        self.head = nn.Linear(4, 3).double()

    def forward(self, x):
        return self.head(self.body(x).mean(1))


class Outer(nn.Module):
    """A module with a parameter of its own around one that applies its child's weight."""

    def __init__(self):
        super().__init__()
        self.inner = Applies()
        self.shift = nn.Parameter(torch.linspace(-0.1, 0.1, 4, dtype=D))

    def forward(self, x):
        return self.inner(x) + self.shift


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 5, 4, dtype=D, generator=g), torch.tensor([0, 2, 1])


def _assert_refused(model):
    """``body.fc.weight`` is refused: no call can take its use."""
    x, y = _batch()
    with indigrad.capture(model) as cap, pytest.raises(RuntimeError, match=r"'body\.fc\.weight'"):
        cap.norms(F.cross_entropy(model(x), y, reduction="none"))


def _check(model):
    def losses(x, y):
        return F.cross_entropy(model(x), y, reduction="none")

    indigrad.testing.check(model, losses, *_batch())


@pytest.mark.parametrize("how", ["functional", "forward"])
def test_a_child_s_weight_applied_by_its_parent(how):
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"Applies 'body' uses \['fc.bias', 'fc.weight'\]"):
        _check(Net(Applies(how=how)))


def test_the_innermost_module_around_takes_it():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="Applies 'body.inner' uses") as record:
        _check(Net(Outer()))
    assert not [w for w in record if "Outer" in str(w.message)]


def test_a_use_beside_the_child_s_own_call_is_an_error():
    """Re-running the parent would take the child's call's share of the gradient again."""
    torch.manual_seed(0)
    _assert_refused(Net(Applies(how="both")))


def test_no_warning_where_the_module_is_read_from_the_graph():
    """A module that needs no re-run for its own parameters is re-run only because of the
    adopted ones: the warning says so; where its own need one anyway, no warning."""

    class Indexed(Applies):
        def forward(self, x):
            return F.linear(x, self.fc.weight) * self.gamma[torch.arange(4)]  # index: re-run

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check(Net(Indexed()))


def test_a_use_outside_the_module_around_is_an_error():
    """The weight of ``body.fc`` applied by the model, around ``body`` but with no parameters
    of its own (no recorded call): ``body``'s call does not hold that use, so it cannot
    take it."""

    class Model(Net):
        def forward(self, x):
            h = self.body(x)  # (n, T, d)
            return self.head(F.linear(h, self.body.fc.weight).mean(1))

    torch.manual_seed(0)
    _assert_refused(Model(Applies(how="unused")))


def test_a_tied_head_written_by_hand_says_how_to_tie_it():
    """The embedding's own call and the head's ``F.linear`` both use the table: the model
    around cannot take it (the embedding's share would count twice); the error says how
    to tie two modules instead."""

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 4).double()
            self.pos = nn.Parameter(torch.zeros(1, 5, 4, dtype=D))

        def forward(self, ids):
            return F.linear(torch.tanh(self.emb(ids) + self.pos), self.emb.weight)

    model = LM()
    ids = torch.randint(0, 11, (3, 5))
    with indigrad.capture(model) as cap, pytest.raises(RuntimeError, match=r"head\.weight = "):
        cap.norms(F.cross_entropy(model(ids).transpose(1, 2), ids, reduction="none").sum(1))
