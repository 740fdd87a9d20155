"""clip_: accumulation into .grad, micro-batches, and the sensitivity bound of DP-SGD."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import BY_NAME

import indigrad


def _clip(model, loss_fn, x, y, max_norm, batch_dim=0):
    with indigrad.capture(model, batch_dim=batch_dim) as cap:
        return cap.clip_(loss_fn(x, y), max_norm=max_norm)


def _grads(model):
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", ["seed_mlp", "linear_3d_ghost", "raw_params", "tied_weights"])
def test_accumulates_into_existing_grad(name):
    model, loss_fn, x, y = BY_NAME[name].build()
    ref = indigrad.testing.clipped_sum(indigrad.testing.loop_grads(model, loss_fn, x, y), 0.3)
    existing = {}
    for k, p in model.named_parameters():
        p.grad = torch.randn_like(p)
        existing[k] = p.grad.clone()
    _clip(model, loss_fn, x, y, 0.3)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, existing[k] + ref[k])


@pytest.mark.parametrize("name", ["seed_mlp", "linear_4d", "generic_kwargs_mask", "seq_first"])
def test_micro_batches_add_up_to_the_whole_batch(name):
    case = BY_NAME[name]
    model, loss_fn, x, y = case.build()
    bd = case.batch_dim
    n = x.shape[bd]
    whole_norms = _clip(model, loss_fn, x, y, 0.2, bd)
    whole = _grads(model)
    model.zero_grad(set_to_none=True)
    parts = []
    for idx in torch.arange(n).split(2):
        parts.append(
            _clip(model, loss_fn, x.index_select(bd, idx), y.index_select(bd, idx), 0.2, bd)
        )
    torch.testing.assert_close(torch.cat(parts), whole_norms)
    for k, g in _grads(model).items():
        torch.testing.assert_close(g, whole[k])


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("name", ["seed_mlp", "deep_mlp", "twice_applied", "raw_params"])
def test_one_example_moves_the_clipped_sum_by_at_most_max_norm(name, seed):
    model, loss_fn, x, y = BY_NAME[name].build(seed=seed)
    x = x * (1 + 10 * seed)  # large inputs: every example is clipped
    max_norm = 0.05
    _clip(model, loss_fn, x, y, max_norm)
    with_all = _grads(model)
    model.zero_grad(set_to_none=True)
    _clip(model, loss_fn, x[1:], y[1:], max_norm)
    without_first = _grads(model)
    diff = torch.cat([(with_all[k] - without_first[k]).flatten() for k in with_all])
    assert diff.norm() <= max_norm * (1 + 1e-12)
    assert diff.norm() > 0


def test_zero_norm_example_is_not_scaled_up():
    model, _loss_fn, x, y = BY_NAME["seed_mlp"].build()
    x = x.clone()
    model.zero_grad(set_to_none=True)
    with indigrad.capture(model) as cap:
        out = model(x)  # (n, 1)
        losses = F.binary_cross_entropy_with_logits(out, y, reduction="none")
        losses = losses * torch.arange(x.shape[0]).ne(0).to(losses.dtype)[:, None]
        norms = cap.clip_(losses, max_norm=1.0)
    assert norms[0] == 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_unused_parameter_gets_a_zero_grad():
    model, loss_fn, x, y = BY_NAME["seed_mlp"].build()
    model.extra = torch.nn.Linear(3, 3).double()  # never called
    _clip(model, loss_fn, x, y, 1.0)
    assert torch.equal(model.extra.weight.grad, torch.zeros(3, 3, dtype=torch.float64))


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_empty_batch(name):
    case = BY_NAME[name]
    model, loss_fn, x, y = case.build()
    bd = case.batch_dim
    x, y = x.narrow(bd, 0, 0), y.narrow(bd, 0, 0)
    with indigrad.capture(model, batch_dim=bd) as cap:
        per_example = cap.backward(loss_fn(x, y))
        grads, norms = per_example.grads(), per_example.norms()
        per_example.clip_(1.0)
    assert norms.shape == (0,)
    for k, p in model.named_parameters():
        if p.requires_grad:
            assert grads[k].shape == (0, *p.shape)
            assert torch.equal(p.grad, torch.zeros_like(p))


@pytest.mark.parametrize("tokens", [False, True], ids=["2d", "3d"])
def test_per_example_grads_are_tensors_of_their_own(tokens):
    # autograd hands both branches of a sum the same gradient tensor: the biases' per-example
    # gradients equal it, and each must still be a tensor of its own
    class Branches(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)

        def forward(self, x):
            return self.a(x) + self.b(x)

    model = Branches()
    x = torch.randn(4, 5, 3) if tokens else torch.randn(4, 3)
    with indigrad.capture(model) as cap:
        grads = cap.grads(model(x).flatten(1).sum(1))
    storages = [g.untyped_storage().data_ptr() for g in grads.values()]
    assert len(set(storages)) == len(storages)
    before = grads["b.bias"].clone()
    grads["a.bias"].add_(1.0)
    torch.testing.assert_close(grads["b.bias"], before)


def test_grads_never_share_storage_even_if_a_rule_returns_one_tensor_twice():
    class TwoScales(torch.nn.Module):  # y = x ⊙ a + x ⊙ b: both gradients are x ⊙ G
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Parameter(torch.ones(3))
            self.b = torch.nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.a + x * self.b

    def grads(module, inputs, G):
        g = inputs[0] * G  # (n, 3)
        return {"a": g, "b": g.clone()}

    def weighted_sum(module, inputs, G, coef):
        ws = coef @ (inputs[0] * G)  # (3,)
        return {"a": ws, "b": ws}  # one tensor for both: legitimate, and must not alias

    def sq_norms(module, inputs, G):
        sq = (inputs[0] * G).square().sum(1)  # (n,)
        return {"a": sq, "b": sq}

    indigrad.register_rule(TwoScales, grads=grads, sq_norms=sq_norms, weighted_sum=weighted_sum)
    try:
        model = TwoScales()
        with indigrad.capture(model) as cap:
            cap.clip_(model(torch.randn(4, 3)).sum(1), max_norm=1.0)
        assert model.a.grad.data_ptr() != model.b.grad.data_ptr()
        before = model.b.grad.clone()
        model.a.grad.add_(1.0)
        torch.testing.assert_close(model.b.grad, before)
    finally:
        indigrad.unregister_rule(TwoScales)


def test_a_sparse_grad_is_refused_before_any_is_changed():
    model = nn.Sequential(nn.Embedding(7, 4, sparse=True), nn.Flatten(), nn.Linear(8, 2))
    ids = torch.tensor([[1, 2], [3, 1]])
    model(ids).sum().backward()  # a sparse .grad for the table, a dense one for the Linear
    before = model[2].weight.grad.clone()
    with indigrad.capture(model) as cap, pytest.raises(ValueError, match="sparse=False"):
        cap.clip_(model(ids).square().sum(1), 1.0)
    torch.testing.assert_close(model[2].weight.grad, before)
