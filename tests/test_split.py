"""The backward split at recurrent layers (``indigrad/_split.py``): where it applies, the
layer's own autograd backward never runs and every quantity still matches the loop;
where a path goes around the layer, the backward is not split."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import indigrad
from indigrad import _split
from indigrad.rules import Split, recurrent

pytestmark = pytest.mark.usefixtures("one_thread")

V, E, H, K = 13, 5, 6, 3


class Tagger(nn.Module):
    """Tokens -> embedding -> Linear -> recurrent layer(s) -> head; ``skip`` adds the
    embedding to the head's input (a path around the recurrent layer), ``tied`` makes the
    head's weight the embedding's."""

    def __init__(
        self,
        cls: type[nn.RNNBase],
        kw: dict[str, Any],
        second: type[nn.RNNBase] | None = None,
        skip: bool = False,
        tied: bool = False,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, E)
        self.lin = nn.Linear(E, E)
        self.rnn = cls(E, H, **kw)
        self.batch_first = kw.get("batch_first", False)
        width = H * (2 if kw.get("bidirectional") else 1)
        self.second = None if second is None else second(width, E, batch_first=self.batch_first)
        self.top = nn.Linear(width if second is None else E, E)
        self.head = nn.Linear(E, V)
        if tied:
            self.head.weight = self.embed.weight
        self.skip = skip

    def forward(self, ids: Tensor) -> Tensor:  # (n, T) -> (n, T, V)
        x = torch.tanh(self.lin(self.embed(ids)))  # (n, T, E)
        seq = x if self.batch_first else x.transpose(0, 1)
        out = self.rnn(seq)[0]
        if self.second is not None:
            out = self.second(torch.tanh(out))[0]
        out = out if self.batch_first else out.transpose(0, 1)  # (n, T, ·)
        z = self.top(out)  # (n, T, E)
        if self.skip:
            z = z + x
        return self.head(z)  # (n, T, V)


def _losses(model: nn.Module) -> Any:
    def losses(ids: Tensor, y: Tensor) -> Tensor:
        logits = model(ids)  # (n, T, V)
        return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").sum(1)  # (n,)

    return losses


def _batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, V, (4, 6), generator=g), torch.randint(0, V, (4, 6), generator=g)


@pytest.fixture
def spied(monkeypatch):
    """The cuts each backward planned, and the recurrent layers whose own autograd
    backward ran (a hook on the node of their output sequence)."""
    cuts: list[list[Any]] = []
    real = _split.plan

    def plan(*args: Any) -> list[Any]:
        found = real(*args)
        cuts.append([cut.call.name for cut in found])
        return found

    monkeypatch.setattr(_split, "plan", plan)
    return cuts


def _layer_backward_ran(model: nn.Module) -> list[str]:
    """The recurrent layers whose own autograd backward ran (a hook on the node of their
    output sequence) in one capture's clipped sum."""
    ran: list[str] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.RNNBase):

            def hook(mod: nn.Module, args: Any, out: Any, name: str = name) -> None:
                out[0].grad_fn.register_hook(lambda *a: ran.append(name))

            handles.append(module.register_forward_hook(hook))
    try:
        with indigrad.capture(model) as cap:
            cap.clip_(_losses(model)(*_batch()), 1.0)
    finally:
        for handle in handles:
            handle.remove()
    return ran


MODES = [nn.LSTM, nn.GRU, nn.RNN]
OPTIONS = {
    "1layer": {},
    "2layers-bi-bf": {"num_layers": 2, "bidirectional": True, "batch_first": True},
    "2layers-no_bias": {"num_layers": 2, "bias": False},
}


@pytest.mark.parametrize("options", OPTIONS, ids=list(OPTIONS))
@pytest.mark.parametrize("cls", MODES, ids=lambda c: c.__name__)
def test_split_matches_loop(cls, options, spied):
    torch.manual_seed(0)
    model = Tagger(cls, OPTIONS[options]).double()
    indigrad.testing.check(model, _losses(model), *_batch(), max_norm=0.5)
    assert spied and all(cuts == ["rnn"] for cuts in spied)  # split in every backward
    assert _layer_backward_ran(model) == []  # and the layer's own backward never ran


@pytest.mark.parametrize("cls", MODES, ids=lambda c: c.__name__)
def test_stacked_layers_split_from_the_top(cls, spied):
    torch.manual_seed(0)
    model = Tagger(cls, {"batch_first": True}, second=nn.GRU).double()
    indigrad.testing.check(model, _losses(model), *_batch(), max_norm=0.5)
    assert spied and all(sorted(cuts) == ["rnn", "second"] for cuts in spied)
    assert _layer_backward_ran(model) == []


def test_tied_head_still_splits(spied):
    """The head's use of the embedding's weight reaches the parameter, not the graph
    below the recurrent layer: the split stands."""
    torch.manual_seed(0)
    model = Tagger(nn.LSTM, {"num_layers": 2}, tied=True).double()
    indigrad.testing.check(model, _losses(model), *_batch(), max_norm=0.5)
    assert spied and all(cuts == ["rnn"] for cuts in spied)


@pytest.mark.parametrize("cls", MODES, ids=lambda c: c.__name__)
def test_a_path_around_the_layer_keeps_one_backward(cls, spied):
    torch.manual_seed(0)
    model = Tagger(cls, {"num_layers": 2}, skip=True).double()
    indigrad.testing.check(model, _losses(model), *_batch(), max_norm=0.5)
    assert spied and all(cuts == [] for cuts in spied)
    assert _layer_backward_ran(model) == ["rnn"]  # it gave the gradient below the layer


def test_no_split_without_the_backward_by_hand(spied, monkeypatch):
    monkeypatch.setattr(recurrent, "_FUSED", False)
    torch.manual_seed(0)
    model = Tagger(nn.GRU, {"num_layers": 2}).double()
    indigrad.testing.check(model, _losses(model), *_batch())
    assert spied and all(cuts == [] for cuts in spied)


def test_no_split_where_nothing_below_is_captured(spied):
    torch.manual_seed(0)
    model = Tagger(nn.LSTM, {})
    for p in [*model.embed.parameters(), *model.lin.parameters()]:
        p.requires_grad_(False)
    indigrad.testing.check(model.double(), _losses(model), *_batch())
    assert spied and all(cuts == [] for cuts in spied)


def test_frozen_input_weights_still_give_the_gradient_below(spied):
    """The gradient below comes from ``W_ih`` whether or not it is trained."""
    torch.manual_seed(0)
    model = Tagger(nn.GRU, {"num_layers": 2, "bidirectional": True}).double()
    model.rnn.weight_ih_l0.requires_grad_(False)
    model.rnn.weight_ih_l0_reverse.requires_grad_(False)
    indigrad.testing.check(model, _losses(model), *_batch(), max_norm=0.5)
    assert spied and all(cuts == ["rnn"] for cuts in spied)


def test_float32_clipped_sum(spied):
    torch.manual_seed(0)
    model = Tagger(nn.LSTM, {"num_layers": 2, "batch_first": True})
    indigrad.testing.check(model, _losses(model), *_batch(), max_norm=0.5, rtol=1e-4, atol=1e-6)
    assert spied and all(cuts == ["rnn"] for cuts in spied)


class Siamese(nn.Module):
    """One GRU called on two sequences, each with its own embedding call: two cuts,
    whose inputs start the second part together."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, E)
        self.rnn = nn.GRU(E, H, batch_first=True)
        self.head = nn.Linear(2 * H, K)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        last = [self.rnn(self.embed(ids))[0][:, -1] for ids in (a, b)]  # 2 × (n, H)
        return self.head(torch.cat(last, 1))  # (n, K)


def test_two_calls_of_one_layer_split_together(spied):
    torch.manual_seed(0)
    model = Siamese().double()
    g = torch.Generator().manual_seed(2)
    a, b = torch.randint(0, V, (4, 6), generator=g), torch.randint(0, V, (4, 6), generator=g)
    y = torch.randint(0, K, (4,), generator=g)

    def losses(a, b, y):
        return F.cross_entropy(model(a, b), y, reduction="none")

    indigrad.testing.check(model, losses, a, b, y, max_norm=0.5)
    assert spied and all(cuts == ["rnn", "rnn"] for cuts in spied)


class Scaled(nn.Module):
    """A module with a parameter of its own, used directly below its LSTM child: the
    parameter's use is an edge of a call without a rule, below the cut."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(E))
        self.lstm = nn.LSTM(E, H, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.lstm(x * self.scale)[0]  # (n, T, H)


class Encoder(nn.Module):
    def __init__(self, checkpointed: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, E)
        self.enc = Scaled()
        self.head = nn.Linear(H, K)
        self.checkpointed = checkpointed

    def forward(self, ids: Tensor) -> Tensor:
        x = self.embed(ids)  # (n, T, E)
        if self.checkpointed:
            h = torch.utils.checkpoint.checkpoint(self.enc, x, use_reentrant=False)
        else:
            h = self.enc(x)
        return self.head(h[:, -1])  # (n, K)


@pytest.mark.parametrize("checkpointed", [False, True], ids=["plain", "checkpointed"])
def test_a_parameter_used_below_the_cut(checkpointed, spied):
    torch.manual_seed(0)
    model = Encoder(checkpointed).double()
    ids, _ = _batch()
    y = torch.randint(0, K, (4,))

    def losses(ids, y):
        return F.cross_entropy(model(ids), y, reduction="none")

    indigrad.testing.check(model, losses, ids, y, max_norm=0.5)
    assert spied and all(cuts == ["enc.lstm"] for cuts in spied)


class FromBelow(nn.Module):
    """An LSTM whose initial state is computed from the layer below its input, given as
    a list (which ``nn.LSTM`` takes as it takes a tuple)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(E, E)
        self.rnn = nn.LSTM(E, E, batch_first=True)
        self.head = nn.Linear(E, K)

    def forward(self, x: Tensor) -> Tensor:  # (n, T, E)
        z = torch.tanh(self.lin(x))  # (n, T, E)
        h0 = z.mean(1)[None]  # (1, n, E)
        return self.head(self.rnn(z, [h0, torch.zeros_like(h0)])[0].mean(1))  # (n, K)


def _regression_losses(model: nn.Module) -> Any:
    def losses(x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(model(x), y, reduction="none")  # (n,)

    return losses


def _features() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, E, generator=g, dtype=torch.float64)
    return x, torch.randint(0, K, (4,), generator=g)


def test_an_initial_state_from_below_keeps_one_backward(spied):
    torch.manual_seed(0)
    model = FromBelow().double()
    indigrad.testing.check(model, _regression_losses(model), *_features(), max_norm=0.5)
    assert spied and all(cuts == [] for cuts in spied)


def test_the_walk_refuses_a_path_through_the_layer_by_itself(spied):
    """With the rule's own test of the initial state switched off, the walk from the
    layer's outputs still finds the path from h0 into the graph below."""
    able = Split(lambda module, inputs: True, recurrent._split_run)
    indigrad.register_rule(nn.LSTM, dataclasses.replace(recurrent.LSTM, split=able))
    try:
        torch.manual_seed(0)
        model = FromBelow().double()
        indigrad.testing.check(model, _regression_losses(model), *_features(), max_norm=0.5)
    finally:
        indigrad.register_rule(nn.LSTM, recurrent.LSTM)
    assert spied and all(cuts == [] for cuts in spied)


class ChangedAfter(nn.Module):
    """A recurrent layer whose output an in-place op changes after the call."""

    def __init__(self, cls: type[nn.RNNBase], how: str) -> None:
        super().__init__()
        self.lin = nn.Linear(E, E)
        self.rnn = cls(E, E, num_layers=2, batch_first=True)
        self.head = nn.Linear(E, K)
        self.how = how

    def forward(self, x: Tensor) -> Tensor:  # (n, T, E)
        z = torch.tanh(self.lin(x))  # (n, T, E)
        out = self.rnn(z)[0]  # (n, T, E)
        if self.how == "add":
            out += z  # a path around the layer too: no split
        elif self.how == "mul":
            out.mul_(2)
        else:
            out[:, 0] = 0
        return self.head(out.mean(1))  # (n, K)


@pytest.mark.parametrize("how", ["add", "mul", "setitem"])
@pytest.mark.parametrize("cls", MODES, ids=lambda c: c.__name__)
def test_an_output_changed_in_place_is_not_read(cls, how, spied):
    """The top layer's states are not read from an output changed after the call."""
    torch.manual_seed(0)
    model = ChangedAfter(cls, how).double()
    indigrad.testing.check(model, _regression_losses(model), *_features(), max_norm=0.5)
    assert spied


@pytest.mark.parametrize("cls", MODES, ids=lambda c: c.__name__)
def test_parameters_in_one_buffer(cls):
    """Weights that are views of one flat buffer (``vector_to_parameters``): the layers'
    products are told apart by where their weights' elements are, not by the buffer.
    (At these sizes a product of the wrong layer has the right size to be taken.)"""
    from torch.nn.utils import parameters_to_vector, vector_to_parameters

    torch.manual_seed(0)
    model = nn.ModuleDict(
        {
            "lin": nn.Linear(3, 3),
            "rnn": cls(3, 2, num_layers=3, batch_first=True, bidirectional=True),
            "head": nn.Linear(4, 1),
        }
    ).double()
    vector_to_parameters(parameters_to_vector(model.parameters()).clone(), model.parameters())

    def losses(x: Tensor, y: Tensor) -> Tensor:
        out = model["rnn"](torch.tanh(model["lin"](x)))[0]  # (n, T, 4)
        return (model["head"](out.mean(1)).squeeze(-1) - y) ** 2  # (n,)

    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(3, 4, 3, generator=g, dtype=torch.float64), torch.randn(3, generator=g)
    indigrad.testing.check(model, losses, x, y.double())


def test_a_parametrized_layer_keeps_one_backward(spied):
    """Weights computed in the graph (a parametrization) could carry a path from below
    that no walk of the inputs sees: such a layer is not split."""
    torch.manual_seed(0)
    model = Tagger(nn.GRU, {"num_layers": 2}).double()
    torch.nn.utils.parametrizations.weight_norm(model.rnn, "weight_hh_l0")
    indigrad.testing.check(model, _losses(model), *_batch(), max_norm=0.5)
    assert spied and all(cuts == [] for cuts in spied)
