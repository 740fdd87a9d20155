"""Layers called on tensors without the batch dimension (position embeddings of arange(T))."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import indigrad


class TinyLM(nn.Module):
    """Token + position embeddings, a Linear on shared learned queries, an LM head."""

    def __init__(self, vocab=11, d=6, T_max=8, pos_shape="T"):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(T_max, d)
        self.queries = nn.Parameter(torch.randn(T_max, d))
        self.q_proj = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab)
        self.pos_shape = pos_shape

    def forward(self, ids):  # ids (n, T)
        T = ids.shape[1]
        pos_ids = torch.arange(T)
        if self.pos_shape == "1T":
            pos_ids = pos_ids[None]  # (1, T), as Hugging Face models do
        h = self.tok(ids) + self.pos(pos_ids)  # (n, T, d) + (T, d) or (1, T, d)
        h = torch.tanh(h * self.q_proj(self.queries[:T]))  # Linear on a batch-free input
        return self.head(h)  # (n, T, vocab)


def _losses(model):
    def losses(ids, y):
        return F.cross_entropy(model(ids).transpose(1, 2), y, reduction="none")  # (n, T)

    return losses


@pytest.mark.parametrize("pos_shape", ["T", "1T"])
@pytest.mark.parametrize("n", [1, 3, 6])
def test_position_embedding_on_arange(pos_shape, n):
    torch.manual_seed(n)
    model = TinyLM(pos_shape=pos_shape).double()
    ids, y = torch.randint(0, 11, (n, 5)), torch.randint(0, 11, (n, 5))
    indigrad.testing.check(model, _losses(model), ids, y)


def test_ambiguous_batch_size_is_an_error():
    model = TinyLM(pos_shape="T").double()
    ids = torch.randint(0, 11, (5, 5))  # n == T: arange(T) looks like a batch
    with indigrad.capture(model) as cap, pytest.raises(RuntimeError, match=r"\(1, T\)"):
        cap.norms(_losses(model)(ids, ids))


class SharedThenSummed(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos = nn.Embedding(8, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):  # x (n, T, 4)
        pos = self.pos(torch.arange(x.shape[1]))  # (T, 4), no batch dim
        return self.fc(x) + pos.sum()  # a reduction of the shared output


def test_shared_output_in_a_reduction_is_an_error():
    model = SharedThenSummed().double()
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    with indigrad.capture(model) as cap, pytest.raises(RuntimeError, match="elementwise"):
        cap.norms(model(x).sum((1, 2)))


def test_outputs_are_unchanged_by_the_capture():
    model = TinyLM().double()
    ids = torch.randint(0, 11, (3, 5))
    plain = model(ids)
    with indigrad.capture(model):
        captured = model(ids)
    torch.testing.assert_close(captured, plain, rtol=0, atol=0)


class SharedLookups(nn.Module):
    """Token embedding plus an embedding of ids shared by the batch (no batch dim)."""

    def __init__(self, pos_ids, **options):
        super().__init__()
        self.pos_ids = pos_ids
        self.tok = nn.Embedding(7, 4)
        self.pos = nn.Embedding(int(pos_ids.max()) + 1, 4, **options)
        self.head = nn.Linear(4, 3)

    def forward(self, ids):  # (n, T)
        return self.head(torch.tanh(self.tok(ids) + self.pos(self.pos_ids)))  # (n, T, 3)


@pytest.mark.parametrize(
    "pos_ids,options",
    [
        (torch.arange(40), {}),  # many positions: past the per-example Gram's reach
        (torch.arange(10) % 3, {}),  # repeated ids: their gradients add before squaring
        (torch.arange(10) % 3, {"padding_idx": 1}),
        (torch.arange(40) % 5, {"padding_idx": 0}),
    ],
    ids=["arange40", "repeats", "repeats_padding", "long_repeats_padding"],
)
def test_ids_shared_by_the_batch(pos_ids, options):
    torch.manual_seed(0)
    model = SharedLookups(pos_ids, **options).double()
    T = pos_ids.shape[0]
    ids, y = torch.randint(0, 7, (4, T)), torch.randint(0, 3, (4, T))

    def losses(ids, y):
        return F.cross_entropy(model(ids).transpose(1, 2), y, reduction="none")

    indigrad.testing.check(model, losses, ids, y)


class Positions(nn.Embedding):
    """BART's learned positions: handed the batch's ids for their shape only, and the
    position ids ``(T,)``, it returns ``(1, T, d)`` for all examples. Its own forward
    sends it to the generic rule, which reshapes its arguments."""

    def forward(self, ids, position_ids=None):  # ids (n, T), position_ids (T,)
        if position_ids is None:
            position_ids = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
        else:
            position_ids = position_ids.unsqueeze(0)  # (1, T)
        return super().forward(position_ids + 1)  # (n or 1, T, d)


class Decoder(nn.Module):
    def __init__(self, vocab=11, d=6, given=True):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = Positions(10, d)
        self.head = nn.Linear(d, vocab)
        self.given = given

    def forward(self, ids):  # (n, T)
        positions = torch.arange(ids.shape[1]) if self.given else None
        shape_of = ids[:1] if self.given == "first" else ids  # (1, T): no batched input
        h = self.tok(ids) + self.pos(shape_of, positions)  # (n, T, d)
        return self.head(torch.tanh(h))  # (n, T, vocab)


@pytest.mark.parametrize("given", [True, False, "first"])
@pytest.mark.parametrize("n", [1, 3])
def test_batched_input_read_for_its_shape_only(given, n):
    """With position ids given, the positions' output has one entry in the batch dimension
    although the batch's ids are among the call's inputs: it is shared, not refused."""
    torch.manual_seed(n)
    model = Decoder(given=given).double()
    ids, y = torch.randint(0, 11, (n, 5)), torch.randint(0, 11, (n, 5))
    indigrad.testing.check(model, _losses(model), ids, y)


class RelativeBias(nn.Module):
    """T5's relative position bias: an embedding of (T, T) bucket ids, permuted to heads
    first before it is added to the batch's scores."""

    def __init__(self, heads=2, d=4):
        super().__init__()
        self.bias = nn.Embedding(9, heads)
        self.fc = nn.Linear(d, heads)

    def forward(self, x):  # (n, T, d)
        T = x.shape[1]
        buckets = torch.arange(T)[None, :] - torch.arange(T)[:, None] + 4  # (T, T)
        bias = self.bias(buckets).permute(2, 0, 1)  # (heads, T, T)
        scores = self.fc(x).transpose(1, 2)[..., None] + bias  # (n, heads, T, T)
        return scores.mean((1, 2, 3))  # (n,)


def test_a_shared_output_reshaped_before_the_batch_says_what_to_do():
    model = RelativeBias().double()
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError) as info, indigrad.capture(model):
        model(x)
    assert "RelativeBias" not in str(info.value.__notes__) and "Embedding 'bias'" in str(
        info.value.__notes__
    )
    model.bias.requires_grad_(False)  # frozen: not expanded, and the rest is exact
    indigrad.testing.check(model, model, x)
