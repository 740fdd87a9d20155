"""nn.Embedding and nn.EmbeddingBag rules against the per-example loop and their own
materialised gradients."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import indigrad
from indigrad.rules import embedding

F64 = torch.float64


# -- nn.Embedding ---------------------------------------------------------------------------


class EmbNet(nn.Module):
    """ids (n, *) -> Embedding -> tanh -> [mean over the lookups] -> Linear."""

    def __init__(self, V: int, d: int, k: int, pool: bool, **options) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, d, **options)
        self.head = nn.Linear(d, k)
        self.pool = pool

    def forward(self, ids: Tensor) -> Tensor:
        h = torch.tanh(self.emb(ids))  # (n, *, d)
        if self.pool and h.dim() > 2:
            h = h.flatten(1, -2).mean(1)  # (n, d)
        return self.head(h)  # (n, k) or (n, *, k)


def _emb_losses(model: EmbNet):
    def losses(ids: Tensor, y: Tensor) -> Tensor:
        out = model(ids)  # (n, k) or (n, *, k)
        return F.cross_entropy(out.movedim(-1, 1), y, reduction="none")  # (n,) or (n, *)

    return losses


# name: (ids shape, V, pool, options); V small against the lookups so that ids repeat
EMBEDDING_CASES = {
    "1d": ((6,), 5, True, {}),
    "2d_pooled": ((5, 7), 4, True, {}),
    "2d_tokens": ((5, 7), 4, False, {}),
    "3d": ((4, 2, 3), 4, True, {}),
    "batch_of_one": ((1, 6), 3, True, {}),
    "long_segment_sum": ((3, 40), 6, True, {}),  # T > _GRAM_MAX_T
    "padding_0": ((5, 7), 4, True, {"padding_idx": 0}),
    "padding_last_negative": ((5, 7), 4, False, {"padding_idx": -1}),
    "padding_1d": ((6,), 3, True, {"padding_idx": 1}),
    "padding_long": ((3, 40), 6, True, {"padding_idx": 2}),
    "max_norm": ((5, 7), 6, True, {"max_norm": 1.0}),
    "max_norm_l1_padding": ((5, 7), 6, True, {"max_norm": 0.7, "norm_type": 1.0, "padding_idx": 3}),
    "scale_grad_by_freq": ((5, 7), 4, True, {"scale_grad_by_freq": True}),
    "scale_grad_by_freq_padding": (
        (5, 7),
        4,
        False,
        {"scale_grad_by_freq": True, "padding_idx": 2},
    ),
    "scale_grad_by_freq_long": ((3, 40), 6, True, {"scale_grad_by_freq": True}),
}


def _emb_problem(name: str, dtype: torch.dtype = F64, seed: int = 0):
    shape, V, pool, options = EMBEDDING_CASES[name]
    torch.manual_seed(seed)
    model = EmbNet(V, 3, 4, pool, **options).to(dtype)
    ids = torch.randint(0, V, shape)
    pad = model.emb.padding_idx
    if pad is not None:  # make sure padding occurs, in some examples only
        ids.view(-1)[:: max(2, ids.numel() // 5)] = pad
    y = torch.randint(0, 4, shape[:1] if pool else shape)
    return model, ids, y


@pytest.mark.parametrize("name", list(EMBEDDING_CASES))
def test_embedding_float64(name):
    model, ids, y = _emb_problem(name)
    flat = ids.reshape(ids.shape[0], -1)
    if flat.shape[1] > 1:  # some example looks up one id several times
        assert any(len(set(row.tolist())) < len(row) for row in flat)
    indigrad.testing.check(model, _emb_losses(model), ids, y)


@pytest.mark.parametrize("name", ["2d_tokens", "padding_long", "scale_grad_by_freq", "1d"])
def test_embedding_float32(name):
    model, ids, y = _emb_problem(name, torch.float32)
    # float32 tolerances of torch.testing.assert_close (rtol 1.3e-6, atol 1e-5)
    indigrad.testing.check(model, _emb_losses(model), ids, y)


def test_embedding_max_norm_renormalises_and_matches():
    model, ids, y = _emb_problem("max_norm")
    before = model.emb.weight.detach().norm(dim=1)
    assert (before[ids.unique()] > 1.0).sum() >= 3  # the renorm has work to do
    indigrad.testing.check(model, _emb_losses(model), ids, y)
    after = model.emb.weight.detach().norm(dim=1)
    assert (after[ids.unique()] <= 1.0).all()


def test_embedding_scale_grad_by_freq_is_per_example():
    """The per-example gradient scales by the id's count within the example, which is what
    the per-example loop computes; it is not the batch gradient's scaling."""
    model, ids, y = _emb_problem("scale_grad_by_freq")
    losses = _emb_losses(model)
    with indigrad.capture(model) as cap:
        grads = cap.grads(losses(ids, y))
    batch = torch.autograd.grad(losses(ids, y).sum(), model.emb.weight)[0]
    assert not torch.allclose(grads["emb.weight"].sum(0), batch)
    ref = indigrad.testing.loop_grads(model, losses, ids, y)
    torch.testing.assert_close(grads["emb.weight"], ref["emb.weight"])


def test_embedding_batch_first_and_sequence_first_agree():
    model, ids, y = _emb_problem("2d_tokens")
    losses = _emb_losses(model)

    def seq_first_losses(ids_t: Tensor, y_t: Tensor) -> Tensor:  # ids_t, y_t (T, n)
        out = model(ids_t)  # (T, n, k)
        return F.cross_entropy(out.permute(1, 2, 0), y_t.T, reduction="none")  # (n, T)

    ref = indigrad.testing.loop_grads(model, losses, ids, y)
    seq_ref = indigrad.testing.loop_grads(model, seq_first_losses, ids.T, y.T, batch_dim=1)
    for k in ref:
        torch.testing.assert_close(seq_ref[k], ref[k])
    indigrad.testing.check(model, seq_first_losses, ids.T, y.T, batch_dim=1)


def test_embedding_int32_ids():
    model, ids, y = _emb_problem("padding_0")
    indigrad.testing.check(model, _emb_losses(model), ids.int(), y)


class TiedLM(nn.Module):
    """GPT-style: token + position embeddings, the LM head tied to the token embedding."""

    def __init__(self, V: int, d: int, T_max: int, **options) -> None:
        super().__init__()
        self.tok = nn.Embedding(V, d, **options)
        self.pos = nn.Embedding(T_max, d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, V, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, ids: Tensor) -> Tensor:  # ids (n, T)
        h = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))  # (n, T, d)
        return self.head(torch.tanh(self.mix(h)))  # (n, T, V)


@pytest.mark.parametrize(
    "T,options,dtype",
    [
        (6, {}, F64),
        (40, {}, F64),  # segment-sum norms, though tied weights take the grads path
        (6, {"padding_idx": 0}, F64),
        (6, {"scale_grad_by_freq": True}, F64),
        (6, {}, torch.float32),
    ],
)
def test_tied_embedding_and_head(T, options, dtype):
    torch.manual_seed(T)
    V = 7
    model = TiedLM(V, 4, T, **options).to(dtype)
    assert next(name for name, _ in model.named_parameters()) == "tok.weight"
    ids, y = torch.randint(0, V, (3, T)), torch.randint(0, V, (3, T))
    ids[:, 0] = 0

    def losses(ids: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(model(ids).transpose(1, 2), y, reduction="none")  # (n, T)

    indigrad.testing.check(model, losses, ids, y)
    # the tied weight really is the sum of both uses, each non-zero
    with indigrad.capture(model) as cap:
        per_example = cap.backward(losses(ids, y))
        total = per_example.grads()["tok.weight"]
    uses = [(e, k) for e, k in per_example._uses["tok.weight"]]
    assert len(uses) == 2
    parts = [e.grads()[k] for e, k in uses]
    assert all(p.abs().sum() > 0 for p in parts)
    torch.testing.assert_close(total, parts[0] + parts[1])


def _dense(t: Tensor) -> Tensor:
    return t.to_dense() if t.is_sparse else t


def test_embedding_sparse_is_dense_and_exact():
    torch.manual_seed(0)
    model = EmbNet(5, 3, 4, True, sparse=True, padding_idx=1).double()
    ids, y = torch.randint(0, 5, (4, 6)), torch.randint(0, 4, (4,))
    ids[0, :2] = 1
    losses = _emb_losses(model)
    ref = {k: _dense(g) for k, g in indigrad.testing.loop_grads(model, losses, ids, y).items()}
    assert indigrad.testing.loop_grads(model, losses, ids, y)["emb.weight"].is_sparse
    ref_norms = indigrad.testing.norms_of(ref)
    with indigrad.capture(model) as cap:
        grads = cap.grads(losses(ids, y))
    for k in ref:
        assert not grads[k].is_sparse
        torch.testing.assert_close(grads[k], ref[k])
    with indigrad.capture(model) as cap:
        torch.testing.assert_close(cap.norms(losses(ids, y)), ref_norms)
    max_norm = float(ref_norms.median())
    expected = indigrad.testing.clipped_sum(ref, max_norm)
    with indigrad.capture(model) as cap:
        cap.clip_(losses(ids, y), max_norm)
    for k, p in model.named_parameters():
        torch.testing.assert_close(_dense(p.grad), expected[k])


# -- the fast paths against the materialised gradients --------------------------------------


def _emb_rule_inputs(n, T, V, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n, T), generator=g)
    G = torch.randn(n, T, d, generator=g, dtype=F64)
    return ids, G


@pytest.mark.parametrize(
    "T,options",
    list(
        itertools.product(
            [1, 5, 40], [{}, {"padding_idx": 2}, {"scale_grad_by_freq": True, "padding_idx": 0}]
        )
    ),
)
def test_embedding_fast_paths_agree_with_materialised(T, options):
    layer = nn.Embedding(6, 4, **options).double()
    ids, G = _emb_rule_inputs(3, T, 6, 4)
    if T > 1:
        ids[:, 1] = 2  # padding in every example
    grads = embedding.embedding_grads(layer, (ids,), G)["weight"]  # (n, V, d)
    torch.testing.assert_close(
        embedding.embedding_sq_norms(layer, (ids,), G)["weight"], grads.flatten(1).square().sum(1)
    )
    coef = torch.rand(3, dtype=F64)
    torch.testing.assert_close(
        embedding.embedding_weighted_sum(layer, (ids,), G, coef)["weight"],
        torch.einsum("n,nvd->vd", coef, grads),
    )
    if layer.padding_idx is not None:
        assert (grads[:, layer.padding_idx] == 0).all()


def test_embedding_grads_is_a_scatter_of_G():
    layer = nn.Embedding(5, 2).double()
    ids = torch.tensor([[1, 3, 1], [4, 4, 4]])
    G = torch.arange(12, dtype=F64).reshape(2, 3, 2)
    W = embedding.embedding_grads(layer, (ids,), G)["weight"]
    expected = torch.zeros(2, 5, 2, dtype=F64)
    expected[0, 1] = G[0, 0] + G[0, 2]
    expected[0, 3] = G[0, 1]
    expected[1, 4] = G[1].sum(0)
    torch.testing.assert_close(W, expected, rtol=0, atol=0)


def test_embedding_gram_and_segment_branches_are_both_taken(monkeypatch):
    taken = []
    real_bmm, real_segment = torch.bmm, embedding._segment_sq_norms
    monkeypatch.setattr(torch, "bmm", lambda *a, **k: taken.append("gram") or real_bmm(*a, **k))
    monkeypatch.setattr(
        embedding,
        "_segment_sq_norms",
        lambda *a, **k: taken.append("segment") or real_segment(*a, **k),
    )
    layer = nn.Embedding(6, 4).double()
    small, large = embedding._GRAM_MAX_T, embedding._GRAM_MAX_T + 1
    embedding.embedding_sq_norms(layer, *_split(*_emb_rule_inputs(2, small, 6, 4)))
    assert taken == ["gram"]
    taken.clear()
    embedding.embedding_sq_norms(layer, *_split(*_emb_rule_inputs(2, large, 6, 4)))
    assert taken == ["segment"]
    taken.clear()
    embedding.embedding_sq_norms(layer, *_split(*_emb_rule_inputs(2, 1, 6, 4)))
    assert taken == []  # one lookup per example: ‖G_i‖²


def _split(ids, G):
    return (ids,), G


# -- nn.EmbeddingBag ------------------------------------------------------------------------


class BagNet(nn.Module):
    """Padded ids (n, L) with lengths (n,) -> EmbeddingBag -> tanh -> Linear.

    ``form``: "2d" passes the padded (n, L) ids (all lengths L); "offsets" and
    "offsets_last" flatten the bags to ids (N,) with offsets, the latter with
    ``include_last_offset=True``."""

    def __init__(self, V: int, d: int, k: int, form: str, psw: bool, **options) -> None:
        super().__init__()
        last = form == "offsets_last"
        self.bag = nn.EmbeddingBag(V, d, include_last_offset=last, **options)
        self.head = nn.Linear(d, k)
        self.form, self.psw = form, psw

    def forward(self, ids: Tensor, lengths: Tensor, weights: Tensor) -> Tensor:
        if self.form == "2d":
            # with a keyword the rule's inputs get the defaults filled; without, (ids,)
            h = self.bag(ids, per_sample_weights=weights) if self.psw else self.bag(ids)
        else:
            keep = torch.arange(ids.shape[1]) < lengths[:, None]  # (n, L)
            offsets = lengths.cumsum(0) - lengths  # (n,)
            if self.form == "offsets_last":
                offsets = torch.cat([offsets, lengths.sum()[None]])  # (n + 1,)
            if self.psw:
                h = self.bag(ids[keep], offsets, weights[keep])
            else:
                h = self.bag(ids[keep], offsets)
        return self.head(torch.tanh(h))  # (n, k)


def _bag_problem(mode, form, psw, options, dtype=F64, n=6, seed=0):
    torch.manual_seed(seed)
    V, L = 5, 6
    model = BagNet(V, 3, 4, form, psw, mode=mode, **options).to(dtype)
    ids = torch.randint(0, V, (n, L))
    pad = model.bag.padding_idx
    if pad is not None:
        ids[0, ::2] = pad
        if n > 2:
            ids[n - 1] = pad  # a bag of padding only
    if form == "2d":
        lengths = torch.full((n,), L)
    else:
        lengths = torch.randint(0, L + 1, (n,))
        lengths[:2] = L
        if n > 3:
            lengths[2] = 0  # an empty bag
    weights = torch.rand(n, L, dtype=dtype) + 0.5
    y = torch.randint(0, 4, (n,))
    return model, (ids, lengths, weights, y)


def _bag_losses(model: BagNet):
    def losses(ids, lengths, weights, y):
        return F.cross_entropy(model(ids, lengths, weights), y, reduction="none")  # (n,)

    return losses


FORMS = ["2d", "offsets", "offsets_last"]
BAG_CASES = [
    (mode, form, psw, options)
    for mode in ["sum", "mean", "max"]
    for form in FORMS
    for psw in ([False, True] if mode == "sum" else [False])
    for options in [{}, {"padding_idx": 1}]
]
BAG_CASES += [(mode, "offsets", False, {"max_norm": 1.0}) for mode in ["sum", "mean", "max"]]


def _bag_id(case):
    mode, form, psw, options = case
    opts = "-".join(f"{k}={v}" for k, v in options.items())
    return f"{mode}-{form}-{'psw' if psw else 'nopsw'}" + (f"-{opts}" if opts else "")


@pytest.mark.parametrize("case", BAG_CASES, ids=_bag_id)
def test_embedding_bag_float64(case):
    model, batch = _bag_problem(*case)
    indigrad.testing.check(model, _bag_losses(model), *batch)


@pytest.mark.parametrize(
    "case",
    [
        ("sum", "offsets", True, {"padding_idx": 1}),
        ("mean", "2d", False, {}),
        ("max", "offsets_last", False, {"padding_idx": 0}),
    ],
    ids=_bag_id,
)
def test_embedding_bag_float32(case):
    model, batch = _bag_problem(*case, dtype=torch.float32)
    # float32 tolerances of torch.testing.assert_close (rtol 1.3e-6, atol 1e-5)
    indigrad.testing.check(model, _bag_losses(model), *batch)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_embedding_bag_batch_of_one(mode, form):
    model, batch = _bag_problem(mode, form, False, {"padding_idx": 4}, n=1)
    indigrad.testing.check(model, _bag_losses(model), *batch)


@pytest.mark.parametrize("form", FORMS)
def test_embedding_bag_max_ties_follow_the_forward(form):
    model, batch = _bag_problem("max", form, False, {})
    with torch.no_grad():
        model.bag.weight[3] = model.bag.weight[2]  # ids 2 and 3 tie in every column
        model.bag.weight[4, 0] = model.bag.weight[0, 0]  # and 0, 4 in the first
    indigrad.testing.check(model, _bag_losses(model), *batch)


def test_embedding_bag_sparse_is_dense_and_exact():
    model, batch = _bag_problem("sum", "offsets", True, {"sparse": True, "padding_idx": 1})
    losses = _bag_losses(model)
    ref = {k: _dense(g) for k, g in indigrad.testing.loop_grads(model, losses, *batch).items()}
    with indigrad.capture(model) as cap:
        per_example = cap.backward(losses(*batch))
        grads, norms = per_example.grads(), per_example.norms()
    for k in ref:
        torch.testing.assert_close(grads[k], ref[k])
    torch.testing.assert_close(norms, indigrad.testing.norms_of(ref))


def _rule_call(model: BagNet, ids, lengths, weights, y):
    """The (inputs, G) the rule sees for the EmbeddingBag call in ``model``."""
    with indigrad.capture(model) as cap:
        per_example = cap.backward(_bag_losses(model)(ids, lengths, weights, y))
    (entry,) = [e for e in per_example._entries if e.call.module is model.bag]
    return entry.inputs, entry.G


@pytest.mark.parametrize("case", BAG_CASES, ids=_bag_id)
def test_embedding_bag_fast_paths_agree_with_materialised(case):
    model, batch = _bag_problem(*case)
    inputs, G = _rule_call(model, *batch)
    grads = embedding.embedding_bag_grads(model.bag, inputs, G)["weight"]  # (n, V, d)
    assert grads.shape == (6, 5, 3)
    torch.testing.assert_close(
        embedding.embedding_bag_sq_norms(model.bag, inputs, G)["weight"],
        grads.flatten(1).square().sum(1),
    )
    coef = torch.rand(6, dtype=F64)
    torch.testing.assert_close(
        embedding.embedding_bag_weighted_sum(model.bag, inputs, G, coef)["weight"],
        torch.einsum("n,nvd->vd", coef, grads),
    )


def test_embedding_bag_inconsistent_offsets_are_errors():
    bag = nn.EmbeddingBag(5, 3, include_last_offset=True).double()
    ids = torch.tensor([0, 1, 2, 3])
    G = torch.randn(2, 3, dtype=F64)
    with pytest.raises(RuntimeError, match="last offset"):
        embedding.embedding_bag_grads(bag, (ids, torch.tensor([0, 2, 3])), G)
    with pytest.raises(RuntimeError, match="give 1 bags"):
        embedding.embedding_bag_grads(bag, (ids, torch.tensor([0, 4])), G)
    bag = nn.EmbeddingBag(5, 3).double()
    with pytest.raises(RuntimeError, match="non-decreasing"):
        embedding.embedding_bag_grads(bag, (ids, torch.tensor([0, 3, 1])), torch.randn(3, 3))


@pytest.mark.parametrize("form", ["2d", "offsets"])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_embedding_bag_scale_grad_by_freq_is_refused(mode, form):
    model, batch = _bag_problem(mode, form, False, {"scale_grad_by_freq": True})
    with indigrad.capture(model) as cap, pytest.raises(RuntimeError, match="scale_grad_by_freq"):
        cap.norms(_bag_losses(model)(*batch))
    # why: PyTorch's own kernel does not scale by each id's frequency in the bag
    W = torch.zeros(4, 1, dtype=F64, requires_grad=True)
    out = F.embedding_bag(torch.tensor([[1, 1, 2, 3, 3, 3]]), W, scale_grad_by_freq=True)
    (g,) = torch.autograd.grad(out.sum(), W)
    if g.flatten().tolist() == [0.0, 1.0, 1.0, 1.0]:
        pytest.fail("torch's embedding_bag scale_grad_by_freq is fixed: support it in the rule")


class SeqFirstBagNet(nn.Module):
    """A sequence-first model: Linear on (T, n, d_x) plus an EmbeddingBag of (n, L) ids."""

    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(5, 3, mode="mean", padding_idx=0)
        self.proj = nn.Linear(2, 3)
        self.head = nn.Linear(3, 4)

    def forward(self, x: Tensor, ids_t: Tensor) -> Tensor:  # x (T, n, 2), ids_t (L, n)
        h = torch.tanh(self.proj(x)).mean(0) + self.bag(ids_t.T)  # (n, 3), bags are batch-first
        return self.head(h[None])  # (1, n, 4), sequence-first again


def test_embedding_bag_in_a_sequence_first_model():
    torch.manual_seed(0)
    model = SeqFirstBagNet().double()
    x, ids_t = torch.randn(7, 3, 2, dtype=F64), torch.randint(0, 5, (4, 3))
    y = torch.randint(0, 4, (1, 3))

    def losses(x: Tensor, ids_t: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(model(x, ids_t)[0], y[0], reduction="none")  # (n,)

    indigrad.testing.check(model, losses, x, ids_t, y, batch_dim=1)


@pytest.mark.parametrize("form", FORMS)
def test_embedding_bag_int32_ids_and_offsets(form):
    model, (ids, lengths, weights, y) = _bag_problem("sum", form, True, {"padding_idx": 1})
    indigrad.testing.check(model, _bag_losses(model), ids.int(), lengths.int(), weights, y)


class SharedBag(nn.Module):
    """An EmbeddingBag computed once for the whole batch (no batch dimension)."""

    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(5, 3)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:  # x (n, 3)
        shared = self.bag(torch.tensor([1, 2, 3]), torch.tensor([0]))  # (1, 3)
        return self.fc(torch.tanh(x + shared))


def test_embedding_bag_shared_by_the_batch_is_an_error():
    """One bag for the whole batch: a raw-layout rule cannot see n, so the framework's
    shape check must refuse its (1, V, d) result instead of broadcasting it into norms."""
    torch.manual_seed(0)
    model = SharedBag().double()
    x, y = torch.randn(4, 3, dtype=F64), torch.randint(0, 2, (4,))
    for what in ["grads", "norms"]:
        with indigrad.capture(model) as cap, pytest.raises(RuntimeError, match="EmbeddingBag"):
            getattr(cap, what)(F.cross_entropy(model(x), y, reduction="none"))
