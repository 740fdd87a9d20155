"""Every rule family on an empty batch (what Poisson sampling produces) and on a batch of one."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import indigrad


class Seq2One(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn, self.head = rnn, nn.Linear(rnn.hidden_size * (2 if rnn.bidirectional else 1), 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


class Attend(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha, self.head = nn.MultiheadAttention(4, 2, batch_first=True), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.mha(x, x, x, need_weights=False)[0].mean(1))


class Bag(nn.Module):
    def __init__(self):
        super().__init__()
        self.bag, self.head = nn.EmbeddingBag(10, 4, mode="mean"), nn.Linear(4, 3)

    def forward(self, ids):
        return self.head(self.bag(ids))


def _tokens(n):
    return torch.randint(0, 10, (n, 5))


def _conv2d():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(16, 3))


def _conv_transpose1d():
    return nn.Sequential(nn.ConvTranspose1d(3, 2, 3, stride=2), nn.Flatten(), nn.Linear(42, 3))


def _embedding_layernorm():
    return nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4), nn.Flatten(), nn.Linear(20, 3))


def _instance_rms_prelu():
    norm = nn.InstanceNorm1d(3, affine=True)
    return nn.Sequential(norm, nn.PReLU(3), nn.Flatten(), nn.RMSNorm(15), nn.Linear(15, 3))


def _lstm():
    return Seq2One(nn.LSTM(4, 6, num_layers=2, batch_first=True, bidirectional=True))


CASES = {
    "conv2d": (_conv2d, lambda n: torch.randn(n, 3, 4, 4)),
    "conv_transpose1d": (_conv_transpose1d, lambda n: torch.randn(n, 3, 10)),
    "embedding_layernorm": (_embedding_layernorm, _tokens),
    "embedding_bag": (Bag, _tokens),
    "attention": (Attend, lambda n: torch.randn(n, 5, 4)),
    "lstm": (_lstm, lambda n: torch.randn(n, 5, 4)),
    "gru": (lambda: Seq2One(nn.GRU(4, 6, batch_first=True)), lambda n: torch.randn(n, 5, 4)),
    "instance_rms_prelu": (_instance_rms_prelu, lambda n: torch.randn(n, 3, 5)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_empty_batch(name):
    if name == "instance_rms_prelu":
        pytest.skip("torch's own InstanceNorm forward fails on an empty batch")
    make, inputs = CASES[name]
    torch.manual_seed(0)
    model = make().double()
    x = inputs(0)
    x = x.double() if x.is_floating_point() else x
    with indigrad.capture(model) as cap:
        per_example = cap.backward(
            F.cross_entropy(model(x), torch.zeros(0, dtype=torch.long), reduction="none")
        )
        grads, norms = per_example.grads(), per_example.norms()
        per_example.clip_(1.0)
    assert norms.shape == (0,)
    for k, p in model.named_parameters():
        assert grads[k].shape == (0, *p.shape)
        assert torch.equal(p.grad, torch.zeros_like(p))


@pytest.mark.parametrize("name", sorted(CASES))
def test_batch_of_one(name):
    make, inputs = CASES[name]
    torch.manual_seed(0)
    model = make().double()
    x = inputs(1)
    x = x.double() if x.is_floating_point() else x
    y = torch.tensor([2])
    indigrad.testing.check(model, lambda x, y: F.cross_entropy(model(x), y, reduction="none"), x, y)
