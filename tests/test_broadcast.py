"""Layers called on tensors without the batch dimension (position embeddings of arange(T))."""

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import GradientEdge

import indigrad
from indigrad.rules import Inner, Rule


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


def test_shared_output_reduced_before_the_batch():
    model = SharedThenSummed().double()
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    indigrad.testing.check(model, lambda x: model(x).square().sum((1, 2)), x)


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
    first before it meets the batch's scores (through a batched mask, or added directly)."""

    def __init__(self, heads=2, d=4, masked=True):
        super().__init__()
        self.bias = nn.Embedding(9, heads)
        self.fc = nn.Linear(d, heads)
        self.masked = masked

    def forward(self, x):  # (n, T, d)
        n, T, _ = x.shape
        buckets = torch.arange(T)[None, :] - torch.arange(T)[:, None] + 4  # (T, T)
        bias = self.bias(buckets).permute(2, 0, 1).unsqueeze(0)  # (1, heads, T, T)
        scores = self.fc(x).transpose(1, 2)[..., None]  # (n, heads, T, 1)
        if self.masked:  # T5: the mask (a constant with the batch) is added to the bias
            mask = torch.zeros(n, 1, T, T, dtype=x.dtype)
            mask[:, :, :, -1] = -1.0
            bias = bias + mask  # (n, heads, T, T)
        scores = scores + bias  # (n, heads, T, T)
        return scores.tanh().mean((1, 2, 3))  # (n,)


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("n", [1, 3])
def test_a_shared_output_permuted_before_it_meets_the_batch(masked, n):
    torch.manual_seed(n)
    model = RelativeBias(masked=masked).double()
    x = torch.randn(n, 5, 4, dtype=torch.float64)
    plain = model(x)
    with indigrad.capture(model):
        torch.testing.assert_close(model(x), plain, rtol=0, atol=0)  # the forward as written
    indigrad.testing.check(model, model, x)


class Shapes(nn.Module):
    """Shared outputs reaching the batch in several ways: ``unsqueeze(0)`` before the add,
    a LayerNorm and an MLP on batch-free tables (layers inside the region; the MLP's ReLU
    in place), a gate that multiplies, masks, one output used twice."""

    def __init__(self, d=4, T=5):
        super().__init__()
        self.pos = nn.Embedding(T, d)
        self.norm = nn.LayerNorm(d)
        self.register_buffer("coords", torch.linspace(-1, 1, T)[:, None, None])  # (T, 1, 1)
        # on 3-d tables a Linear's output is a view, which the in-place ReLU rebuilds
        self.mlp = nn.Sequential(nn.Linear(1, 8), nn.ReLU(inplace=True), nn.Linear(8, d))
        self.gate = nn.Linear(d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):  # (n, T, d)
        T = x.shape[1]
        pos = self.pos(torch.arange(T))  # (T, d)
        h = x + self.norm(pos).unsqueeze(0) + 0.5 * pos  # pos used twice
        h = h + self.mlp(self.coords[:T]).squeeze(1)  # (n, T, d)
        h = h * torch.sigmoid(self.gate(pos))  # a shared gate
        h = torch.where(x > 0, pos, h) + torch.where(x < 0.5, h, 0.3 * pos)  # masks
        return self.head(torch.tanh(h))  # (n, T, 3)


class Nested(nn.Module):
    """A position embedding used only through a LayerNorm: the meets take the LayerNorm's
    output (twice), and the embedding's gradients go back through it."""

    def __init__(self, d=4, T=5):
        super().__init__()
        self.pos = nn.Embedding(T, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):  # (n, T, d)
        p = self.norm(self.pos(torch.arange(x.shape[1])))  # (T, d)
        return self.head(torch.tanh(x + p) * p)


@pytest.mark.parametrize("module", [Shapes, Nested])
@pytest.mark.parametrize("n", [1, 2, 6])
def test_shared_outputs_through_layers_and_ops(module, n):
    torch.manual_seed(n)
    model = module().double()
    x = torch.randn(n, 5, 4, dtype=torch.float64)
    indigrad.testing.check(model, lambda x: model(x).square().sum((1, 2)), x)


class Refused(nn.Module):
    def __init__(self, how, d=4):
        super().__init__()
        self.pos = nn.Embedding(6, d)
        self.fc = nn.Linear(d, d)
        self.how = how

    def forward(self, x):  # (n, T, d)
        n, T, d = x.shape
        pos = self.pos(torch.arange(T))  # (T, d)
        if self.how == "matmul":  # a product with the batch: not elementwise
            h = x @ pos.T  # (n, T, T)
        elif self.how == "repeat":  # the batch made by an op outside the table
            h = x + pos.unsqueeze(0).repeat(n, 1, 1)
        elif self.how == "merged":  # the batch merged with windows (Swin V2's bias)
            y = self.fc(x).reshape(n * T, 1, d)  # (n·T, 1, d)
            h = (y + pos.reshape(T, 1, d).repeat(n, 1, 1)).reshape(n, T, d)
        else:  # the examples mixed in a batch-free shape: the input is no parameter
            mixed = (x.reshape(n * T, d) * pos.repeat(n, 1)).sum(0, keepdim=True)  # (1, d)
            h = x + mixed
        return self.fc(h[..., :d]).square().sum((1, 2))  # (n,)


@pytest.mark.parametrize(
    "how,says",
    [
        ("matmul", r"a tensor that adds dimensions \(MmBackward0\)"),
        ("repeat", r"meets the batch in RepeatBackward0"),
        ("merged", r"where the batch's dimension is not kept \(AddBackward0\)"),
        ("mixed", r"where the batch's dimension is not kept \(MulBackward0\)"),
    ],
)
def test_a_shared_output_that_cannot_be_followed_is_refused(how, says):
    model = Refused(how).double()
    x = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=how == "mixed")
    for quantity in ("grads", "norms", "clip_"):
        with indigrad.capture(model) as cap, pytest.raises(RuntimeError) as info:
            args = (1.0,) if quantity == "clip_" else ()
            getattr(cap, quantity)(model(x), *args)
        message = str(info.value)
        assert "Embedding 'pos' was called without the batch dimension" in message, message
        assert re.search(says, message), message
    if how != "mixed":  # (which couples the examples: no per-example gradients to compare)
        model.pos.requires_grad_(False)  # frozen: the rest is exact
        indigrad.testing.check(model, model, x)


class ReadsInside(nn.Module):
    """A layer whose rule reads a gradient inside the call, at an op on its second input."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(4))

    def forward(self, x, b):  # (n, T, 4), (T, 4)
        return x * self.w + b * 2.0


def _inside(module, node, stop):
    mul = node.next_functions[1][0]  # b * 2.0: batch-free when b is (None when b is frozen)
    return None if mul is None else Inner(None, (GradientEdge(mul, 0),))


def test_a_rule_reading_inside_a_shared_output_is_refused():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Embedding(6, 4)
            self.layer = ReadsInside()

        def forward(self, x):
            return self.layer(x, self.pos(torch.arange(x.shape[1]))).square().sum((1, 2))

    def grads(module, inputs, G):
        return {"w": torch.einsum("ntd,ntd->nd", G, inputs[0])}

    indigrad.register_rule(ReadsInside, Rule(grads, inner=_inside))
    try:
        model = Model().double()
        x = torch.randn(3, 5, 4, dtype=torch.float64)
        inside = pytest.raises(RuntimeError, match="before that output")
        with indigrad.capture(model) as cap, inside:
            cap.norms(model(x))
        model.pos.requires_grad_(False)
        indigrad.testing.check(model, model, x)
    finally:
        indigrad.unregister_rule(ReadsInside)


class Windows(nn.Module):
    """Swin V2's attention in small: a bias computed by a layer on a batch-free table, added
    where the batch is merged with the windows. The module has a parameter of its own and
    no rule: it takes the layer's parameters and is re-run for each example."""

    def __init__(self, d=4, T=8):
        super().__init__()
        self.register_buffer("coords", torch.linspace(-1, 1, T // 2)[:, None])  # (T/2, 1)
        self.table = nn.Linear(1, d)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):  # (n, T, d)
        n, T, d = x.shape
        windows = x.reshape(n * 2, T // 2, d) + self.table(self.coords)  # (2n, T/2, d)
        return windows.reshape(n, T, d) * self.scale


def test_a_shared_layer_inside_a_module_without_a_rule_is_taken_by_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), Windows(), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(3, 8, 4, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"Windows '1' is re-run.*Linear '1.table'.*not kept"):
        indigrad.testing.check(model, lambda x: model(x).square().sum((1, 2)), x)


class Sources(nn.Module):
    """Layers on tensors without grad whose batch dimension could be chance."""

    def __init__(self, how, d=4):
        super().__init__()
        self.tok = nn.Embedding(11, d)
        self.pos = nn.Embedding(8, d)
        self.bias = nn.Embedding(9, 2)
        self.head = nn.Linear(d, 2)
        self.how = how

    def forward(self, ids):  # (n, T)
        T = ids.shape[1]
        if self.how == "transposed":  # sequence-first inside (XLNet): (T, n, d)
            return self.head(self.tok(ids.t())).transpose(0, 1).sum((1, 2))
        if self.how in ("shifted", "permuted", "swapped"):  # ids made inside, shifted right
            ids = torch.cat([torch.zeros_like(ids[:, :1]), ids[:, :-1]], 1)
        h = self.tok(ids)  # (n, T, d): the model's input, any T
        if self.how == "permuted":  # the batch moved and back: followed
            h = h.permute(1, 2, 0).permute(2, 0, 1)
        if self.how == "swapped":  # the losses' examples are the tokens: refused
            return h.tanh().transpose(0, 1)
        if self.how == "positions":  # arange(T), 1-d
            h = h + self.pos(torch.arange(T)).unsqueeze(0)
        if self.how == "relative":  # (T, T) buckets, as T5's
            buckets = (torch.arange(T)[None, :] - torch.arange(T)[:, None] + 4).clamp(0, 8)
            rel = self.bias(buckets).permute(2, 0, 1).unsqueeze(0)  # (1, 2, T, T)
            scores = h.sum(-1)[:, None, :, None] + rel  # (n, 2, T, T)
            return torch.tanh(scores).sum((1, 2, 3)) + self.head(h).sum((1, 2))
        return self.head(torch.tanh(h)).sum((1, 2))  # (n,)


@pytest.mark.parametrize("how", ["transposed", "positions", "relative", "swapped"])
def test_a_batch_dimension_that_could_be_chance_is_refused(how):
    """With T = n, the model's own ids are batched; a table of positions (1-d, or (T, T)),
    transposed ids (sequence-first inside) or losses whose examples are the tokens could
    look batched by chance, and their batch dimension is not followed to the losses' or to
    an input that shows it: refused. With T ≠ n the same models are exact (or refused for
    being sequence-first)."""
    model = Sources(how).double()
    ids = torch.randint(0, 11, (5, 5))
    with indigrad.capture(model) as cap, pytest.raises(RuntimeError, match="cannot follow"):
        cap.norms(model(ids))
    if how not in ("transposed", "swapped"):
        indigrad.testing.check(model, model, torch.randint(0, 11, (5, 6)))


@pytest.mark.parametrize("how", ["shifted", "permuted"])
@pytest.mark.parametrize("T", [5, 6])
def test_ids_made_inside_the_model_followed_to_the_batch(how, T):
    """Decoder ids shifted inside the model: with T = n too, their batch dimension is
    followed to the losses' (through the head, whose input proves nothing then)."""
    torch.manual_seed(0)
    model = Sources(how).double()
    indigrad.testing.check(model, model, torch.randint(0, 11, (5, T)))


def test_the_models_own_ids_with_as_many_tokens_as_examples():
    torch.manual_seed(0)
    model = Sources("plain").double()
    ids = torch.randint(0, 11, (5, 5))
    indigrad.testing.check(model, model, ids)
    indigrad.testing.check(model, model, ids[:, :5])  # a view keeping the batch dimension


class Coordinates(nn.Module):
    """A small MLP on a float table of T coordinates made in the forward, shared by all
    examples, through an op before it meets the batch."""

    def __init__(self, d=4):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.coord = nn.Linear(2, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):  # (n, T, d)
        T = x.shape[1]
        table = torch.stack([torch.linspace(0, 1, T), torch.linspace(1, 0, T) ** 2], 1)
        pe = torch.tanh(self.coord(table.to(x.dtype)))  # (T, d)
        return self.head(torch.tanh(self.inp(x) + pe)).sum((1, 2))  # (n,)


@pytest.mark.parametrize("T", [3, 4])
def test_a_float_table_as_long_as_the_batch(T):
    """With T = n the table's rows look like examples; its first dimension is followed to
    where it ends (not the batch's) and refused. With T ≠ n the model is exact."""
    torch.manual_seed(0)
    model = Coordinates().double()
    x = torch.randn(4, T, 4, dtype=torch.float64)
    if T != 4:
        indigrad.testing.check(model, model, x)
        return
    with indigrad.capture(model) as cap, pytest.raises(RuntimeError, match="does not end"):
        cap.norms(model(x))


class Prototypes(nn.Module):
    """Logits against a table of class prototypes, the table through a layer of its own."""

    def __init__(self, classes, d=5, trainable=False):
        super().__init__()
        self.f = nn.Linear(d, d)
        self.g = nn.Linear(d, d)
        if trainable:
            self.table = nn.Parameter(torch.randn(classes, d))
        else:
            self.register_buffer("table", torch.randn(classes, d))

    def forward(self, x):  # (n, d)
        return self.f(x) @ self.g(self.table).T  # (n, classes)


@pytest.mark.parametrize("trainable", [False, True])
def test_prototypes_as_many_as_the_examples(trainable):
    """The table's first dimension is contracted by nothing but becomes the logits'
    classes, over which the loss takes its softmax: refused, where it had looked batched
    (a trainable table too: a parameter is no example's)."""
    torch.manual_seed(0)
    model = Prototypes(4, trainable=trainable).double()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 4, (4,))
    with indigrad.capture(model) as cap, pytest.raises(RuntimeError, match="does not end"):
        cap.norms(F.cross_entropy(model(x), y, reduction="none"))


def _encoder():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4)).double()


# how a few-shot loss compares the queries z (n, 4) with the encoded support e (n, 4):
# each makes the support's dimension something other than the batch's
SUPPORT = {
    "distances": lambda z, e: -(z[:, None] - e[None]).square().sum(-1),  # (n, k) logits
    "class means": lambda z, e: z @ e.view(2, 2, 4).mean(1).T,  # 2-way 2-shot
    "cdist": lambda z, e: -torch.cdist(z, e),
    "soft nearest": lambda z, e: (z @ e.T).logsumexp(1, keepdim=True).expand(-1, 4),
    "nearest": lambda z, e: (z[:, None] * e[None]).sum(-1).max(1, keepdim=True).values + z,
}


@pytest.mark.parametrize("compare", list(SUPPORT))
def test_a_support_set_as_long_as_the_batch(compare):
    """A few-shot loss: the encoder runs on a support set of k anchors, then on the batch
    of queries. With k = n the support's rows look like examples; the model ran twice, so
    its inputs are followed, and the support's dimension is found to become the logits'
    classes, regrouped, or reduced: refused (before, the gradients were off by 41-174 %)."""
    enc = _encoder()
    queries, y = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    support = torch.randn(4, 5, dtype=torch.float64)

    def losses(queries, y):
        e = enc(support)  # (k, 4)
        return F.cross_entropy(SUPPORT[compare](enc(queries), e), y, reduction="none")

    with indigrad.capture(enc) as cap, pytest.raises(RuntimeError, match="support set"):
        cap.norms(losses(queries, y))


def test_a_support_set_sliced_from_the_batch_s_tensor():
    """Support and queries as two slices of one episode tensor, handed to a model that
    encodes both: its layers read two parts of its input, so they are followed."""
    torch.manual_seed(0)
    enc = _encoder()

    class Episode(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = enc

        def forward(self, support, queries):  # (k, 5), (n, 5)
            return SUPPORT["distances"](self.enc(queries), self.enc(support))

    model, episode = Episode(), torch.randn(8, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])
    with indigrad.capture(model) as cap, pytest.raises(RuntimeError, match="support set"):
        cap.norms(F.cross_entropy(model(episode[:4], episode[4:]), y, reduction="none"))


class Protonet(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = _encoder()

    def forward(self, queries, protos):  # (n, 5), (k, 4)
        return SUPPORT["distances"](self.enc(queries), protos)


def test_a_support_set_encoded_by_a_submodule():
    """The support encoded by the model's submodule outside the model's forward: a call
    outside the forward on tensors from outside the graph is another run on the model's
    inputs (it was read as a batch, off by 71 %)."""
    model = Protonet()
    queries, support = torch.randn(2, 4, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 0])
    with indigrad.capture(model) as cap, pytest.raises(RuntimeError, match="support set"):
        logits = model(queries, model.enc(support))
        cap.norms(F.cross_entropy(logits, y, reduction="none"))


def test_two_views_of_the_batch():
    """The model run twice, each time on the examples' own rows: followed, and passes."""
    enc = _encoder()
    queries, views = torch.randn(2, 4, 5, dtype=torch.float64)
    indigrad.testing.check(enc, lambda q, v: (enc(q) - enc(v)).square().sum(1), queries, views)


class WithTable(nn.Module):
    """A table handed to the model beside the batch, as its first argument."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 3), nn.Linear(5, 3)

    def forward(self, table, x):  # (T, 5), (n, 5)
        return self.a(x) + self.b(table).mean(0)  # (n, 3)


def test_a_table_handed_in_beside_the_batch():
    """With T = n, the table's call looks batched; the model had two tensors of the
    batch's size, so its inputs are followed: the table's rows are averaged away,
    refused. Two inputs that are both the batch's pass and match the loop."""
    torch.manual_seed(0)
    model = WithTable().double()
    x = torch.randn(4, 5, dtype=torch.float64)
    table = torch.randn(4, 5, dtype=torch.float64)
    with indigrad.capture(model) as cap, pytest.raises(RuntimeError, match="support set"):
        cap.norms(model(table, x).square().sum(1))
    pair = Pair().double()
    u, v = torch.randn(2, 4, 5, dtype=torch.float64)
    indigrad.testing.check(pair, lambda u, v: pair(u, v).square().sum(1), u, v)


class Pair(nn.Module):
    """Two inputs, both the batch's."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 3), nn.Linear(5, 3)

    def forward(self, u, v):  # (n, 5) each
        return self.a(u) * torch.tanh(self.b(v))  # (n, 3)


class LastState(nn.Module):
    """A GRU's last state as the features, its input rescaled inside the model."""

    def __init__(self):
        super().__init__()
        self.emb, self.gru = nn.Linear(3, 4), nn.GRU(4, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):  # (n, T, 3)
        _, h = self.gru(self.emb(x * 2 - 1))  # (1, n, 4): the batch in dimension 1
        return self.head(h.transpose(0, 1)).squeeze(1)  # (n, 2)


def test_a_layer_with_its_own_batch_convention_ends_the_follow():
    """With T = n, the recurrent layer's input has two dimensions of n entries, and where
    its outputs have the batch is the layer's to say: the follow of the rescaled input,
    and of the model's input where the model ran twice, ends there, undecided (it had
    gone on with the input's dimension and refused)."""
    torch.manual_seed(0)
    model = LastState().double()
    x, y = torch.randn(3, 3, 3, dtype=torch.float64), torch.tensor([0, 1, 1])

    def losses(x, y):
        with torch.no_grad():
            model(x)  # the model runs twice: its inputs are followed too
        return F.cross_entropy(model(x), y, reduction="none")

    indigrad.testing.check(model, losses, x, y)


class ShiftedDecoder(nn.Module):
    """Decoder ids shifted right inside the model, through a layer with its own batch
    convention."""

    def __init__(self, kind, vocab=12, d=4):
        super().__init__()
        self.embed, self.out = nn.Embedding(vocab, d), nn.Linear(d, vocab)
        if kind == "gru":
            self.mix = nn.GRU(d, d, batch_first=True)
        else:
            self.mix = nn.MultiheadAttention(d, 2, batch_first=True)

    def forward(self, targets):  # (n, Td)
        ids = torch.cat([torch.zeros_like(targets[:, :1]), targets[:, :-1]], 1)  # (n, Td)
        e = self.embed(ids)  # (n, Td, d)
        if isinstance(self.mix, nn.GRU):
            h = self.mix(e)[0]
        else:
            h = self.mix(e, e, e, need_weights=False)[0]
        return self.out(h)  # (n, Td, vocab)


@pytest.mark.parametrize("kind", ["gru", "attention"])
@pytest.mark.parametrize("n, Td, d", [(3, 5, 4), (3, 3, 4), (4, 5, 4)])
def test_shifted_ids_through_a_layer_of_its_own_layout(kind, n, Td, d):
    """The ids' dimension is followed into the layer at its batch position, and on from
    its outputs at theirs, where the layer's input has another dimension of n entries
    (Td = n, or d = n)."""
    torch.manual_seed(0)
    model = ShiftedDecoder(kind, d=d).double()
    targets = torch.randint(0, 12, (n, Td))

    def losses(t):
        return F.cross_entropy(model(t).transpose(1, 2), t, reduction="none").sum(1)

    indigrad.testing.check(model, losses, targets)


class Resampler(nn.Module):
    """A trainable table of ``latents`` queries, normalised and projected on its own, that
    attends over each example's tokens (a Perceiver-style resampler): ``(L, d)`` before it
    meets the batch in the product with the keys."""

    def __init__(self, latents, d=4):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(latents, d))
        self.norm, self.q, self.kv = nn.LayerNorm(d), nn.Linear(d, d), nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, 2)

    def forward(self, x):  # (n, T, d)
        q = self.q(self.norm(self.latents)).unsqueeze(0)  # (1, L, d)
        k, v = self.kv(x).chunk(2, -1)  # (n, T, d) each
        a = torch.softmax(q @ k.transpose(1, 2), -1)  # (n, L, T)
        return self.out((a @ v).mean(1))  # (n, 2)


def test_latents_as_many_as_the_examples():
    """With L = n, the projection of the latents looks batched by its size, and so does
    the norm's call, whose output alone feeds it: the path on from the projection shows
    the latents' dimension averaged away, so both are refused. With L != n the latents
    are shared, and each example's gradients are read where they meet the batch."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    model = Resampler(latents=3).double()
    with indigrad.capture(model) as cap, pytest.raises(RuntimeError, match="does not end"):
        cap.norms(model(x).square().sum(1))
    model = Resampler(latents=4).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the resampler is re-run for each example
        indigrad.testing.check(model, lambda x: model(x).square().sum(1), x)


def test_a_dimension_followed_through_ops():
    from indigrad._graph import MIXED, _moved

    x = torch.randn(3, 4, 5, requires_grad=True)
    here = (3, 4, 5)
    cases = [
        (x + torch.zeros(2, 1, 1, 1), 0, (1, 3)),  # broadcast to 4-d: aligned from the right
        (x.permute(2, 0, 1), 0, (1, 3)),
        (x.transpose(0, 2), 2, (0, 5)),
        (x.unsqueeze(0), 0, (1, 3)),
        (x.unsqueeze(-1), 1, (1, 4)),
        (x.view(3, 20), 0, (0, 3)),
        (x.view(12, 5), 0, None),  # the batch merged: not followed
        (x.sum(1), 0, (0, 3)),
        (x.mean((0, 2)), 1, (0, 4)),
        (x.sum(-1, keepdim=True), 1, (1, 4)),
        (x.sum(0), 0, MIXED),  # the batch summed
        (x.sum(), 1, MIXED),
        (torch.cat([x, x], 2), 1, (1, 4)),
        (x[:, 1:], 0, (0, 3)),
        (x[:, 0], 2, (1, 5)),
        (x[:, :, 0], 0, (0, 3)),
        (x.log_softmax(1), 0, (0, 3)),
        (x.softmax(0), 0, MIXED),
        (F.cross_entropy(x, torch.zeros(3, 5, dtype=torch.long), reduction="none"), 0, (0, 3)),
        (F.cross_entropy(x, torch.zeros(3, 5, dtype=torch.long)), 0, MIXED),  # reduced
        (F.mse_loss(x, torch.zeros(3, 4, 5), reduction="none"), 2, (2, 5)),
        (x.softmax(-1), 0, (0, 3)),
        (x.cumsum(1), 0, None),  # an op not in the table
    ]
    for y, b, expected in cases:
        assert _moved(y.grad_fn, b, here) == expected, y.grad_fn
    for y, b, shape, expected in [  # reshapes: a dimension kept whole, by the sizes before it
        (x.view(3, 2, 2, 5), 2, here, (3, 5)),
        (x.reshape(1, 3, 4, 5, 1), 1, here, (2, 4)),
        (x.flatten(1), 0, here, (0, 3)),
        (x.flatten(1), 1, here, None),
        (x[None].squeeze(0), 1, (1, 3, 4, 5), (0, 3)),
        (x[:, None].squeeze(1), 2, (3, 1, 4, 5), (1, 4)),
        (x.view(3, 2, 2, 5), 1, here, MIXED),  # split: its entries regrouped
        (x.view(12, 5), 1, here, None),  # merged with the batch
    ]:
        assert _moved(y.grad_fn, b, shape) == expected, (y.grad_fn, b)
    for y, b, expected in [  # reductions over a dimension, or all of them
        (x.max(1).values, 0, (0, 3)),
        (x.max(0).values, 0, MIXED),
        (x.max(), 2, MIXED),
        (x.logsumexp(1), 2, (1, 5)),
        (x.logsumexp((0, 2), keepdim=True), 0, MIXED),
        (x.norm(dim=2), 1, (1, 4)),
        (x.std(1), 1, MIXED),
        (x.median(2).values, 0, (0, 3)),
    ]:
        assert _moved(y.grad_fn, b, here) == expected, (y.grad_fn, b)
    q, k, v = (torch.randn(3, 2, 4, 8, dtype=torch.float64, requires_grad=True) for _ in "qkv")
    y = F.scaled_dot_product_attention(q, k, v)  # (3, 2, 4, 8): a node of its own on a CPU
    if type(y.grad_fn).__name__.startswith("ScaledDotProduct"):
        for slot, b, expected in [
            (0, 0, (0, 3)),  # the batch
            (0, 2, (2, 4)),  # the queries' positions
            (0, 3, MIXED),  # the features, contracted with the keys'
            (1, 2, MIXED),  # the keys' positions, attended over
            (2, 3, (3, 8)),  # the values' features
        ]:
            assert _moved(y.grad_fn, b, (3, 2, 4, 8), slot) == expected, (slot, b)
    a, c = torch.randn(3, 5, requires_grad=True), torch.randn(4, 5)
    for slot, b, expected in [(0, 0, (0, 3)), (0, 1, MIXED), (1, 0, (1, 4)), (1, 1, MIXED)]:
        y = torch.cdist(a, c) if slot == 0 else torch.cdist(c, a)  # (3, 4), (4, 3)
        shape = (3, 5)
        want = expected if slot == 0 or expected == MIXED else (1, 3)
        assert _moved(y.grad_fn, b, shape, slot) == want, (slot, b)
    left, right = torch.randn(5, 2), torch.randn(2, 4)
    for y, slot, b, expected in [  # a product of x[0] (4, 5): which side, and which dim
        (x[0] @ left, 0, 0, (0, 4)),
        (x[0] @ left, 0, 1, MIXED),  # contracted
        (right @ x[0], 1, 1, (1, 5)),
        (right @ x[0], 1, 0, MIXED),
        (torch.bmm(x, x.transpose(1, 2)), 0, 0, (0, 3)),  # (3, 4, 5) @ (3, 5, 4)
        (torch.bmm(x, x.transpose(1, 2)), 0, 2, MIXED),
    ]:
        assert _moved(y.grad_fn, b, (4, 5) if y.dim() == 2 else here, slot) == expected, y


class NoTensorInput(nn.Module):
    """A bias computed from the module's own table and an int, as BEiT's relative position
    bias is: no tensor input, an output shared by all examples."""

    def __init__(self, d=4):
        super().__init__()
        self.table = nn.Parameter(torch.linspace(-1, 1, 5 * d).reshape(5, d))

    def forward(self, size):
        return self.table[:size].sum(0, keepdim=True)  # (1, d)


def test_a_layer_called_without_a_tensor():
    torch.manual_seed(0)
    model = nn.ModuleDict({"fc": nn.Linear(4, 4), "bias": NoTensorInput()}).double()
    model.forward = lambda x: (model.fc(x) + model.bias(3)).tanh().sum(1)
    indigrad.testing.check(model, model, torch.randn(3, 4, dtype=torch.float64))


class _PooledHead(nn.Module):
    """A sequence-first encoder (batch in dimension 1) pooled over time into a head."""

    def __init__(self, classes: int, keepdim: bool) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 6)
        self.head = nn.Linear(6, classes)
        self.keepdim = keepdim

    def forward(self, x):  # (T, n, 5)
        h = torch.tanh(self.embed(x)).mean(0, keepdim=self.keepdim)  # (n, 6) or (1, n, 6)
        return self.head(h) if not self.keepdim else self.head(h)[0]  # (n, classes)


@pytest.mark.parametrize(
    "classes, says",
    [(3, "reaches the losses without meeting the batch"), (4, "by chance")],
)
def test_a_batch_first_head_under_batch_dim_1_is_refused(classes, says):
    # batch_dim=1, the head called on (n, 6): its output has no batch in dimension 1 (3
    # classes), and would be taken as shared, its gradient never read; or it has 4 = n
    # entries there by chance, and its rows would be taken for examples.
    model = _PooledHead(classes, keepdim=False).double()
    x, y = torch.randn(7, 4, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    with pytest.raises(RuntimeError, match=says), indigrad.capture(model, batch_dim=1) as cap:
        cap.grads(F.cross_entropy(model(x), y, reduction="none"))


@pytest.mark.parametrize("classes", [3, 4])
def test_a_pooled_head_that_keeps_the_batch_dimension(classes):
    model = _PooledHead(classes, keepdim=True).double()
    x, y = torch.randn(7, 4, 5, dtype=torch.float64), torch.tensor([[0, 1, 2, 0]])

    def losses(x, y):
        return F.cross_entropy(model(x), y[0], reduction="none")

    indigrad.testing.check(model, losses, x, y, batch_dim=1)


class _Positions(nn.Module):
    """A shared table of positions from arange(T), returned with a leading 1: (1, T, d)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.scale = nn.Linear(1, 3), nn.Parameter(torch.linspace(0.5, 1.5, 3))

    def forward(self, t):  # (T,)
        return (self.lin(t[:, None]) * self.scale).unsqueeze(0)  # (1, T, 3)


class _WithPositions(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pos, self.head = _Positions(), nn.Linear(3, 2)
        self.classes = nn.Parameter(torch.randn(1, 2))
        self.proj = nn.Linear(2, 2)

    def forward(self, x):  # (n, T, 3)
        h = self.head(x + self.pos(torch.arange(x.shape[1], dtype=x.dtype)))  # (n, T, 2)
        return h.mean(1) @ self.proj(self.classes).T  # (n, 1): a table of one class


@pytest.mark.parametrize("n", [1, 2])
def test_one_example_takes_any_dimension_of_one_entry_for_its_batch(n):
    # With one example, a table of one row (a parameter) and an output (1, T, d) made from
    # arange(T) are the example's own: not refused as a batch made by a layer, or followed.
    torch.manual_seed(0)
    model = _WithPositions().double()
    x = torch.randn(n, 4, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # n = 2: the model is re-run for its classes' layer
        indigrad.testing.check(model, lambda x: model(x).square().sum(1), x)
