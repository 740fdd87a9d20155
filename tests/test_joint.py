"""Small materialised gradients reduced together (``indigrad._joint``): one norm and one
sum for all of them, against the per-example loop."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import indigrad
from indigrad import _joint
from indigrad.testing import clipped_sum, loop_grads, norms_of

pytestmark = pytest.mark.usefixtures("one_thread")


def _cnn() -> nn.Module:
    # convs at few positions (ghost norms, conv weighted sums) around GroupNorms, whose
    # (n, C) gradients are materialised: the joint's case
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.GroupNorm(2, 8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2),
        nn.GroupNorm(4, 8),
        nn.Flatten(),
        nn.Linear(8 * 2 * 2, 5),
    ).double()


def _batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 5, 5, generator=g, dtype=torch.float64), torch.arange(n) % 5


def _loss(model: nn.Module):
    return lambda x, y: F.cross_entropy(model(x), y, reduction="none")


def _spy(monkeypatch) -> list[str]:
    taken: list[str] = []
    real = _joint.Joint.take

    def take(self, name, g):
        ok = real(self, name, g)
        if ok:
            taken.append(name)
        return ok

    monkeypatch.setattr(_joint.Joint, "take", take)
    return taken


def test_small_gradients_share_one_norm_and_one_sum(monkeypatch):
    taken = _spy(monkeypatch)
    model = _cnn()
    x, y = _batch()
    indigrad.testing.check(model, _loss(model), x, y)
    assert {"1.weight", "1.bias", "4.weight", "4.bias"} <= set(taken)  # the GroupNorms'
    assert "6.weight" not in taken  # the head's norm and sum have a fast path: not materialised


def test_a_gradient_above_the_limit_keeps_its_own_norm_and_sum(monkeypatch):
    taken = _spy(monkeypatch)
    monkeypatch.setitem(_joint._MAX_ELEMENTS, "cpu", 6 * 8)  # (6, 8): no conv weight
    model = _cnn()
    x, y = _batch()
    indigrad.testing.check(model, _loss(model), x, y)
    assert "1.weight" in taken and "0.weight" not in taken  # (6, 8, 3, 3, 3): its own


def test_no_joint_at_all_gives_the_same_numbers(monkeypatch):
    model = _cnn()
    x, y = _batch()
    with indigrad.capture(model) as cap:
        norms = cap.clip_(_loss(model)(x, y), max_norm=0.5)
    joint = {k: p.grad for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    monkeypatch.setattr(_joint.Joint, "take", lambda self, name, g: False)
    with indigrad.capture(model) as cap:
        alone = cap.clip_(_loss(model)(x, y), max_norm=0.5)
    torch.testing.assert_close(norms, alone)
    for k, p in model.named_parameters():
        torch.testing.assert_close(joint[k], p.grad)


def test_joint_sums_become_separate_grads():
    model = _cnn()
    x, y = _batch()
    with indigrad.capture(model) as cap:
        cap.clip_(_loss(model)(x, y), max_norm=0.5)
    gn = model[1]
    # views of one buffer (no copy each), but disjoint: each .grad is its own
    assert gn.weight.grad.untyped_storage().data_ptr() == gn.bias.grad.untyped_storage().data_ptr()
    bias = gn.bias.grad.clone()
    gn.weight.grad.add_(1.0)
    torch.testing.assert_close(gn.bias.grad, bias)
    # an optimiser step and a zeroing keep working on them, and a second clipped sum adds
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.step()
    opt.zero_grad(set_to_none=False)
    assert all(torch.all(p.grad == 0) for p in model.parameters())
    with indigrad.capture(model) as cap:
        cap.clip_(_loss(model)(x, y), max_norm=0.5)
    expected = clipped_sum(loop_grads(model, _loss(model), x, y), 0.5)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[k])


def test_one_backward_answers_norms_then_two_clipped_sums_and_squared_norms():
    model = _cnn()
    x, y = _batch()
    ref = loop_grads(model, _loss(model), x, y)
    with indigrad.capture(model) as cap:
        per_example = cap.backward(_loss(model)(x, y))
        torch.testing.assert_close(per_example.norms(), norms_of(ref))
        per_example.clip_(0.5)
        per_example.clip_(0.5)  # the joint keeps what a second sum needs
        sq = per_example.sq_norms()
    expected = clipped_sum(ref, 0.5)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * expected[k])
        torch.testing.assert_close(sq[k], ref[k].flatten(1).square().sum(1))


def test_gradients_of_another_dtype_keep_their_own():
    class Mixed(nn.Module):  # a float64 layer, then a float32 one
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 3).double()
            self.b = nn.Linear(3, 2)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)).float())

    model = Mixed()
    x = torch.randn(5, 4, dtype=torch.float64)
    y = torch.arange(5) % 2
    indigrad.testing.check(model, _loss(model), x, y, rtol=1e-5, atol=1e-6)
