"""Parameters used directly in a forward (class tokens, position embeddings, layer scales):
the generic rule's fast path, against the per-example loop, and where it must step aside."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_sums_to_batch_gradient
from torch import nn

import indigrad
from indigrad import _joint, quantities
from indigrad.rules import direct

D = torch.float64


@pytest.fixture
def reruns(monkeypatch):
    """The labels of the calls that the generic rule re-ran."""
    labels = []
    original = quantities.generic_grads

    def spy(call, n, bd):
        labels.append(call.label)
        return original(call, n, bd)

    monkeypatch.setattr(quantities, "generic_grads", spy)
    return labels


class Token(nn.Module):
    """A ViT's embedding: a class token expanded to the batch, a position embedding added."""

    def __init__(self, d, T):
        super().__init__()
        self.token = nn.Parameter(torch.randn(1, 1, d, dtype=D))
        self.pos = nn.Parameter(torch.randn(1, T + 1, d, dtype=D))
        self.unused = nn.Parameter(torch.randn(d, dtype=D))

    def forward(self, x):  # (n, T, d)
        tok = self.token.expand(x.shape[0], -1, -1)  # (n, 1, d)
        return torch.cat([tok, x], dim=1) + self.pos  # (n, T + 1, d)


class Ops(nn.Module):
    """Every op of the table, with scales, both operand orders and parameters used twice."""

    def __init__(self, d):
        super().__init__()
        self.a = nn.Parameter(torch.linspace(-1, 1, d, dtype=D))
        self.b = nn.Parameter(torch.linspace(0.5, 1.5, d, dtype=D))
        self.c = nn.Parameter(torch.linspace(0.1, 0.3, d, dtype=D).reshape(1, d))
        self.gamma = nn.Parameter(torch.linspace(0.7, 1.3, d, dtype=D))

    def forward(self, x):  # (n, T, d)
        h = torch.sub(x, self.a, alpha=2.0)  # x − 2a
        h = torch.sub(self.b, torch.tanh(h), alpha=0.5)  # b − 0.5 tanh(·)
        h = h.add(self.c, alpha=3.0) * self.gamma  # (· + 3c) ⊙ γ
        h = torch.where(x > 0, self.c, h) + torch.where(x > 0.5, h, self.b)  # masks
        return self.gamma * torch.tanh(h) + self.a  # γ and a used twice


class Net(nn.Module):
    def __init__(self, body, d, k):
        super().__init__()
        self.inp = nn.Linear(d, d).double()
        self.body = body
        self.head = nn.Linear(d, k).double()

    def forward(self, x):
        return self.head(self.body(self.inp(x)).mean(1))


def _data(n=5, T=3, d=4, k=3):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, T, d, dtype=D, generator=g), torch.randint(0, k, (n,), generator=g)


def _check(model, x, y):
    def losses(x, y):
        return F.cross_entropy(model(x), y, reduction="none")

    indigrad.testing.check(model, losses, x, y)


@pytest.mark.parametrize("body", ["token", "ops"])
def test_direct_uses_match_the_loop(body, no_rerun):
    torch.manual_seed(0)
    x, y = _data()
    model = Net(Token(4, 3) if body == "token" else Ops(4), 4, 3)
    _check(model, x, y)


def test_direct_uses_with_the_batch_second(no_rerun):
    """A sequence-first model: a position embedding (T, 1, d), batch in dimension 1."""

    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = nn.Parameter(torch.randn(3, 1, 4, dtype=D))
            self.head = nn.Linear(4, 3).double()

        def forward(self, x):  # (T, n, d)
            return self.head(torch.tanh(x + self.pos))  # (T, n, k)

    torch.manual_seed(0)
    x, y = _data()
    model = SeqFirst()
    indigrad.testing.check(
        model,
        lambda x, y: F.cross_entropy(model(x).mean(0), y[0], reduction="none"),
        x.transpose(0, 1),
        y[None],  # (1, n): sliced along the batch dimension as well
        batch_dim=1,
    )


def test_the_zoo_raw_parameters_take_the_fast_path(no_rerun):
    from zoo import BY_NAME

    for name in ("raw_params", "generic_scale", "seq_first_generic"):
        case = BY_NAME[name]
        model, loss_fn, x, y = case.build()
        indigrad.testing.check(model, loss_fn, x, y, batch_dim=case.batch_dim)


class MatmulScale(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.eye(d, dtype=D) + 0.1)
        self.s = nn.Parameter(torch.ones(d, dtype=D))

    def forward(self, x):
        return (x @ self.w) * self.s  # w through a matmul: not in the table


class ViewedPos(nn.Module):
    def __init__(self, T, d):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(T * d, dtype=D))
        self.T, self.d = T, d

    def forward(self, x):
        return x + self.pos.view(1, self.T, self.d)  # reaches the add through a view


class SquareScale(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, d, dtype=D))

    def forward(self, x):
        return x * (self.s * self.s)  # s ⊙ s has no batch


class Temperature(nn.Module):
    def __init__(self):
        super().__init__()
        self.t = nn.Parameter(torch.tensor(0.3, dtype=D))  # a scalar: (n,) per-example

    def forward(self, x):
        return x * self.t.exp()  # through exp: not in the table


@pytest.mark.parametrize("body", ["matmul", "view", "square", "temperature"])
def test_other_uses_rerun_the_module(body, reruns):
    """One use outside the table sends the whole module to the generic rule (all its
    parameters), which still matches the loop."""
    torch.manual_seed(0)
    x, y = _data()
    module = {
        "matmul": MatmulScale(4),
        "view": ViewedPos(3, 4),
        "square": SquareScale(4),
        "temperature": Temperature(),
    }[body]
    model = Net(module, 4, 3)
    _check(model, x, y)
    assert reruns and set(reruns) == {f"{type(module).__name__} 'body'"}


class Transposed(nn.Module):
    """The batch moved inside the module: the parameters broadcast along it in dimension 1
    (transposed) or 2 (permuted)."""

    def __init__(self, d, how):
        super().__init__()
        shape = (d, 1) if how == "permute" else (d,)
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, d, dtype=D).reshape(shape))
        self.b = nn.Parameter(torch.linspace(-0.2, 0.2, d, dtype=D).reshape(shape))
        self.how = how

    def forward(self, x):  # (n, T, d)
        if self.how == "transpose":
            h = x.transpose(-3, -2)  # (T, n, d)
            return (torch.tanh(h * self.s) - self.b).transpose(0, 1)  # (n, T, d)
        if self.how == "permute":
            h = torch.tanh(x).permute(-2, -1, 0)  # (T, d, n)
            return (torch.tanh(h * self.s) - self.b).permute(2, 0, 1)  # (n, T, d)
        # (1, n, T, d): a view, which the trace does not follow
        return (torch.tanh(x.unsqueeze(0) * self.s) - self.b)[0]  # (n, T, d)


class Viewed(Ops):
    def forward(self, x):  # (n, T, d): a view between the input and the uses
        return super().forward(x.flatten(1).view(x.shape))


@pytest.mark.parametrize("n", [3, 5])
def test_the_batch_is_traced_through_the_graph(n, no_rerun):
    """Where a parameter is broadcast along more than one dimension of ``n`` entries (T =
    n), or along one that is not the capture's batch dimension (a layout transposed inside
    the module), the batch is traced back to the module's input."""
    torch.manual_seed(0)
    x, y = _data(n=n, T=3)
    for body in (Ops(4), Transposed(4, "transpose"), Transposed(4, "permute")):
        _check(Net(body, 4, 3), x, y)


def test_an_untraceable_batch_reruns_the_module(reruns):
    """Through a view the batch cannot be traced: with T = n the module is re-run rather
    than the batch guessed; with another batch size the capture's batch dimension is the
    only candidate, and nothing is re-run."""
    torch.manual_seed(0)
    x, y = _data(n=3, T=3)
    _check(Net(Viewed(4), 4, 3), x, y)
    assert set(reruns) == {"Viewed 'body'"}
    reruns.clear()
    x, y = _data(n=4, T=3)
    _check(Net(Viewed(4), 4, 3), x, y)
    assert reruns == []
    _check(Net(Transposed(4, "unsqueeze"), 4, 3), x, y)  # the batch in dimension 1
    assert reruns == ["Transposed 'body'"] * len(reruns) and reruns


def test_why_a_module_with_randomness_cannot_be_rerun():
    """Where the graph cannot be read, the error says why the module had to be re-run."""
    torch.manual_seed(0)
    model = Net(DropoutViewed(4), 4, 3).train()
    x, y = _data(n=3, T=3)  # (3, 3, 4): positions as many as examples
    with indigrad.capture(model) as cap, pytest.raises(RuntimeError, match=r"dimensions \[0, 1\]"):
        cap.grads(F.cross_entropy(model(x), y, reduction="none"))
    x, y = _data(n=4, T=3)
    with indigrad.capture(model) as cap:  # another batch size: read from the graph
        cap.grads(F.cross_entropy(model(x), y, reduction="none"))
    model = Net(DropoutMatmul(4), 4, 3).train()
    with indigrad.capture(model) as cap, pytest.raises(RuntimeError, match="'w' meets the batch"):
        cap.grads(F.cross_entropy(model(x), y, reduction="none"))


class DropoutViewed(Viewed):
    def forward(self, x):
        return F.dropout(super().forward(x), 0.5, self.training)


class DropoutMatmul(MatmulScale):
    def forward(self, x):
        return F.dropout(super().forward(x), 0.5, self.training)


def test_broadcast_test():
    p = torch.zeros(1, 1, 4)
    assert direct._broadcasts(p, (5, 3, 4), 5, 0) and direct._candidates(p, (5, 3, 4), 5) == [0]
    assert direct._candidates(p, (5, 5, 4), 5) == [0, 1]  # positions as many as examples
    assert direct._candidates(torch.zeros(5, 1, 4), (5, 5, 4), 5) == [1]
    assert direct._broadcasts(p, (1, 1, 4), 1, 0)
    assert not direct._broadcasts(torch.zeros(5, 1, 4), (5, 3, 4), 5, 0)  # p has the batch's
    assert not direct._broadcasts(p, (3, 5, 4), 5, 0)  # dimension 0 is not the batch
    assert direct._broadcasts(torch.zeros(3, 1, 4), (3, 5, 4), 5, 1)
    assert not direct._broadcasts(torch.zeros(2, 4), (5, 3, 4), 5, 0)  # does not broadcast


class DropoutToken(Token):
    def forward(self, x):
        return F.dropout(super().forward(x), 0.5, self.training)


def test_dropout_after_a_direct_use(no_rerun):
    """Random masks after the uses are the forward's own (no re-run has to reproduce
    them)."""
    torch.manual_seed(0)
    x, y = _data()
    model = Net(DropoutToken(4, 3), 4, 3).train()

    def losses(x, y):
        return F.cross_entropy(model(x), y, reduction="none")

    grads, _ = assert_sums_to_batch_gradient(model, losses, x, y)
    assert grads["body.token"].abs().sum() > 0 and grads["body.unused"].abs().sum() == 0


class Scaled(nn.Embedding):
    """An embedding with a forward of its own (Hugging Face's scaled word embeddings): its
    table meets the batch in the lookup, read from the graph like the ops above."""

    def __init__(self, *args, buffer=False, gain=False, **kwargs):
        super().__init__(*args, **kwargs)
        if buffer:  # Gemma's: a buffer
            self.register_buffer("scale", torch.tensor(1.5, dtype=D), persistent=False)
        elif gain:  # a parameter of its own beside the table
            self.scale = nn.Parameter(torch.linspace(0.5, 1.5, self.embedding_dim))
        else:  # BART's: a number
            self.scale = 1.5

    def forward(self, ids):
        return super().forward(ids) * self.scale


class TwoLookups(nn.Module):
    """One call that looks its table up twice: the uses' gradients are summed."""

    def __init__(self, V, d):
        super().__init__()
        self.table = nn.Parameter(torch.randn(V, d))

    def forward(self, ids):
        return F.embedding(ids, self.table) - 0.5 * F.embedding(ids.flip(1), self.table)


class Lookups(nn.Module):
    def __init__(self, how, V=7, d=4, k=3, **options):
        super().__init__()
        if how == "two lookups":
            self.emb = TwoLookups(V, d).double()
        else:
            self.emb = Scaled(V, d, buffer=how == "buffer", gain=how == "gain", **options)
            self.emb.double()
        self.head = nn.Linear(d, k).double()
        self.how = how

    def forward(self, ids):  # (n, T)
        h = self.emb(ids)  # (n, T, d)
        if self.how == "twice":  # the same table called again: two calls, one parameter
            h = h + self.emb(ids.flip(1))
        return self.head(torch.tanh(h).mean(1))  # (n, k)


LOOKUP_OPTIONS = [
    {},
    {"padding_idx": 2},
    {"scale_grad_by_freq": True},
    {"padding_idx": 0, "scale_grad_by_freq": True},
]


def _ids(n=4, T=5, V=7):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, V, (n, T), generator=g), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("options", LOOKUP_OPTIONS, ids=str)
@pytest.mark.parametrize("how", ["number", "buffer", "gain", "twice", "two lookups"])
def test_lookups_match_the_loop(how, options, no_rerun):
    if how == "two lookups" and options:
        pytest.skip("a raw table has no options")
    torch.manual_seed(0)
    model = Lookups(how, **options)
    ids, y = _ids()
    _check(model, ids, y)


@pytest.mark.parametrize("joint", [True, False])
@pytest.mark.parametrize("how", ["number", "gain", "twice"])
def test_lookup_norms_and_sums_take_no_per_example_tables(how, joint, monkeypatch):
    """A table's norms and clipped sum come from the ``nn.Embedding`` rule's, without the
    (n, V, d) per-example gradients; a table called twice takes the Grams of its uses.
    A parameter beside it materialises, and joins the small gradients or not."""
    if not joint:
        monkeypatch.setitem(_joint._MAX_ELEMENTS, "cpu", 0)
    torch.manual_seed(0)
    model = Lookups(how, V=30, padding_idx=2)  # V d = 120 > (2 T)²: the Grams are smaller
    ids, y = _ids(V=30)
    with indigrad.capture(model) as cap:
        per = cap.backward(F.cross_entropy(model(ids), y, reduction="none"))
        expected = per.grads()
    reference = torch.cat([g.flatten(1) for g in expected.values()], 1).norm(dim=1)

    def materialised(*args):
        raise AssertionError("per-example tables materialised")

    monkeypatch.setattr(direct, "embedding_grads", materialised)
    with indigrad.capture(model) as cap:
        per = cap.backward(F.cross_entropy(model(ids), y, reduction="none"))
        torch.testing.assert_close(per.norms(), reference)
        per.clip_(0.5)
    coef = (0.5 / reference).clamp(max=1.0)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, torch.einsum("n,n...->...", coef, expected[k]), msg=k)


def test_lookup_with_ids_as_wide_as_the_batch_reruns(reruns):
    """Ids (n, T) with T = n: either dimension could be the batch, so the module is re-run."""
    torch.manual_seed(0)
    model = Lookups("number")
    ids, y = _ids(n=4, T=4)
    _check(model, ids, y)
    assert reruns == ["Scaled 'emb'"] * len(reruns) and reruns


def test_lookup_with_the_batch_second(no_rerun):
    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = Scaled(7, 4).double()
            self.head = nn.Linear(4, 3).double()

        def forward(self, ids):  # (T, n)
            return self.head(self.emb(ids))  # (T, n, 3)

    torch.manual_seed(0)
    model = SeqFirst()
    ids, y = _ids()
    indigrad.testing.check(
        model,
        lambda ids, y: F.cross_entropy(model(ids).mean(0), y[0], reduction="none"),
        ids.T,
        y[None],
        batch_dim=1,
    )
