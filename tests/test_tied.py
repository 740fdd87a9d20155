"""Parameters used by several calls: norms from the Grams of their uses (rules/tied.py)."""

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import indigrad
from indigrad import quantities
from indigrad.testing import check


class TiedLM(nn.Module):
    """Token embedding shared with the output head, a Linear applied at every position."""

    def __init__(self, V: int, d: int, **embedding: object) -> None:
        super().__init__()
        self.tok = nn.Embedding(V, d, **embedding)  # type: ignore[arg-type]
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, V, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, ids: Tensor) -> Tensor:  # (n, T) -> (n, T, V)
        return self.head(torch.tanh(self.mix(self.tok(ids))))


class Twice(nn.Module):
    """One layer applied twice (its weight and bias each have two uses)."""

    def __init__(self, layer: nn.Module, d: int) -> None:
        super().__init__()
        self.layer, self.out = layer, nn.Linear(d, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.layer(torch.tanh(self.layer(x)))))


def _token_losses(model: nn.Module):
    def losses(ids: Tensor) -> Tensor:
        logits = model(ids[:, :-1])  # (n, T, V)
        return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")

    return losses


def _materialised(monkeypatch) -> list[str]:
    names: list[str] = []
    real = quantities._Entry.grads
    monkeypatch.setattr(
        quantities._Entry, "grads", lambda self: names.append(self.call.name) or real(self)
    )
    return names


@pytest.mark.parametrize(
    "embedding",
    [{}, {"padding_idx": 2}, {"scale_grad_by_freq": True}],
    ids=["plain", "padding_idx", "scale_grad_by_freq"],
)
def test_tied_embedding_and_head_match_the_reference(embedding, monkeypatch):
    torch.manual_seed(0)
    model = TiedLM(V=31, d=8, **embedding).double()
    ids = torch.randint(0, 31, (4, 6))
    ids[0, :3] = 2  # repeated ids (and padding, where padding_idx = 2)
    materialised = _materialised(monkeypatch)
    with indigrad.capture(model) as cap:
        cap.norms(_token_losses(model)(ids))
    assert "tok" not in materialised and "head" not in materialised  # Grams: (5 + 5)² < 31 · 8
    check(model, _token_losses(model), ids)


@pytest.mark.parametrize("T", [None, 5], ids=["vectors", "sequences"])
def test_a_linear_applied_twice_matches_the_reference(T, monkeypatch):
    torch.manual_seed(0)
    model = Twice(nn.Linear(12, 12), 12).double()
    x = torch.randn(4, 12, dtype=torch.float64) if T is None else torch.randn(4, T, 12).double()
    y = torch.randint(0, 3, (4,) if T is None else (4, T))

    def losses(x: Tensor, y: Tensor) -> Tensor:
        out = model(x)
        losses = F.cross_entropy(out.reshape(-1, 3), y.reshape(-1), reduction="none")
        return losses.view(len(x), -1)  # (n, T)

    materialised = _materialised(monkeypatch)
    with indigrad.capture(model) as cap:
        cap.norms(losses(x, y))
    # Grams of (1 + 1)² or (5 + 5)² elements against 144 weights: no gradient is kept
    assert materialised == []
    check(model, losses, x, y)


class NarrowTwice(nn.Module):
    """A Linear with one input feature applied twice: its weight's right factor (A) has
    width 1, as a bias's has, and must not be taken for one."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down, self.out = nn.Linear(1, 6), nn.Linear(6, 1), nn.Linear(1, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.down(torch.tanh(self.up(x)))  # (n, 1)
        return self.out(self.down(torch.tanh(self.up(torch.tanh(h)))))


def test_a_weight_with_one_input_feature_applied_twice_matches_the_reference(monkeypatch):
    torch.manual_seed(0)
    model = NarrowTwice().double()
    x, y = torch.randn(4, 1, dtype=torch.float64), torch.randint(0, 3, (4,))
    materialised = _materialised(monkeypatch)
    with indigrad.capture(model) as cap:
        cap.norms(F.cross_entropy(model(x), y, reduction="none"))
    assert materialised == []  # (1 + 1)² Gram elements against 6 weights: the Grams
    check(model, lambda x, y: F.cross_entropy(model(x), y, reduction="none"), x, y)


def test_an_embedding_applied_twice_matches_the_reference():
    torch.manual_seed(0)
    emb = nn.Embedding(9, 4).double()
    head = nn.Linear(4, 3).double()
    model = nn.ModuleDict({"emb": emb, "head": head})

    def losses(a: Tensor, b: Tensor, y: Tensor) -> Tensor:
        h = emb(a).sum(1) + emb(b).mean(1)  # (n, 4): two lookups of one table
        return F.cross_entropy(head(h), y, reduction="none")

    a, b = torch.randint(0, 9, (5, 3)), torch.randint(0, 9, (5, 4))
    b[:, 0] = a[:, 0]  # ids shared between the two uses
    check(model, losses, a, b, torch.randint(0, 3, (5,)))


class LinearThenConv1D(nn.Module):
    """A square weight used as Linear's (out, in) and as Hugging Face Conv1D's (in, out)."""

    def __init__(self, conv1d: type[nn.Module], d: int) -> None:
        super().__init__()
        self.lin, self.conv, self.out = nn.Linear(d, d), conv1d(d, d), nn.Linear(d, 3)
        self.conv.weight = self.lin.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.conv(torch.tanh(self.lin(x)))))


@pytest.mark.parametrize("tie", ["twice", "with_linear"])
def test_hugging_face_conv1d_tied_matches_the_reference(tie):
    Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D
    torch.manual_seed(0)
    model = Twice(Conv1D(6, 6), 6) if tie == "twice" else LinearThenConv1D(Conv1D, 6)
    model = model.double()
    x, y = torch.randn(4, 2, 6, dtype=torch.float64), torch.randint(0, 3, (4, 2))

    def losses(x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(model(x).transpose(1, 2), y, reduction="none")

    check(model, losses, x, y)


def test_a_small_layer_at_many_positions_is_materialised(monkeypatch):
    torch.manual_seed(0)
    model = Twice(nn.Linear(2, 2), 2).double()
    x, y = torch.randn(3, 8, 2, dtype=torch.float64), torch.randint(0, 3, (3, 8))

    def losses(x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(model(x).transpose(1, 2), y, reduction="none")

    materialised = _materialised(monkeypatch)
    with indigrad.capture(model) as cap:
        cap.norms(losses(x, y))
    # (8 + 8)² Gram elements against 4 weights: the shared layer materialises, and `out`
    # (used once) keeps its own rule's norms
    assert set(materialised) == {"layer"}
    check(model, losses, x, y)
