"""Parametrized weights (torch.nn.utils.parametrize): the module's rule takes the computed
weight's per-example gradients, the originals' follow by the chain rule."""

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import orthogonal, spectral_norm, weight_norm

import indigrad

D = torch.float64


class Symmetric(nn.Module):
    def forward(self, X):
        return X.triu() + X.triu(1).T


class Positive(nn.Module):
    def forward(self, x):
        return F.softplus(x)


class Gain(nn.Module):
    """No rule of its own: the generic rule, through its parametrized weight."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(-1, 1, d, dtype=D))

    def forward(self, x):
        return torch.tanh(x) * self.weight


def _sym(m):
    parametrize.register_parametrization(m, "weight", Symmetric())
    return m


def _positive(m):
    parametrize.register_parametrization(m, "weight", Positive())
    return m


def _frozen_g(m):
    m = weight_norm(m)
    m.parametrizations.weight.original0.requires_grad_(False)  # the norm g, frozen
    return m


WRAPS = {
    "weight_norm": weight_norm,
    "spectral_norm": spectral_norm,
    "orthogonal": orthogonal,
    "symmetric": _sym,
    "frozen_g": _frozen_g,
}


@pytest.mark.parametrize("wrap", list(WRAPS))
def test_parametrized_linear(wrap):
    torch.manual_seed(0)
    first = WRAPS[wrap](nn.Linear(4, 4).double())
    model = nn.Sequential(first, nn.Tanh(), nn.Linear(4, 3).double()).eval()
    x, y = torch.randn(3, 5, 4, dtype=D), torch.tensor([0, 2, 1])
    indigrad.testing.check(
        model, lambda x, y: F.cross_entropy(model(x).mean(1), y, reduction="none"), x, y
    )


@pytest.mark.parametrize("wrap", ["weight_norm", "spectral_norm"])
def test_parametrized_conv(wrap):
    torch.manual_seed(0)
    model = nn.Sequential(
        WRAPS[wrap](nn.Conv2d(2, 3, 3, padding=1).double()),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 16, 3).double(),
    ).eval()
    x, y = torch.randn(3, 2, 4, 4, dtype=D), torch.tensor([0, 2, 1])
    indigrad.testing.check(model, lambda x, y: F.cross_entropy(model(x), y, reduction="none"), x, y)


def test_parametrized_weight_of_a_module_without_a_rule():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4).double(), _positive(Gain(4)), nn.Linear(4, 3).double())
    x, y = torch.randn(3, 4, dtype=D), torch.tensor([0, 2, 1])
    indigrad.testing.check(model, lambda x, y: F.cross_entropy(model(x), y, reduction="none"), x, y)


class Scaled(nn.Module):
    """A parametrization with a parameter of its own: a learnt scale per row."""

    def __init__(self, rows):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, rows, dtype=D)[:, None])

    def forward(self, W):
        return W * self.scale


@pytest.mark.parametrize("n", [3, 4])  # 4: as many examples as the weight has rows
def test_a_parametrization_with_parameters_of_its_own(n):
    """Its parameters are originals of the weight too, owned by the layer's call: the
    parametrization's own call (on no batch, its output as many rows as the examples at
    n = 4) is not read as a layer's."""
    torch.manual_seed(0)
    first = nn.Linear(4, 4).double()
    parametrize.register_parametrization(first, "weight", Scaled(4))
    parametrize.register_parametrization(first, "weight", Symmetric())
    model = nn.Sequential(first, nn.Tanh(), nn.Linear(4, 2).double())
    x = torch.randn(n, 4, dtype=D)
    indigrad.testing.check(model, lambda x: model(x).square().sum(1), x)


class Attending(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True, dtype=D)
        self.head = nn.Linear(4, 2, dtype=D)

    def forward(self, x):  # (n, T, 4)
        return self.head(self.attention(x, x, x, need_weights=False)[0].mean(1))  # (n, 2)


@pytest.mark.parametrize("wrap", ["weight_norm", "scaled"])
def test_a_parametrized_layer_inside_a_rule_of_the_subtree(wrap):
    """Attention's rule covers its out_proj: a parametrized out_proj's originals follow
    from the rule's gradients of its weight (it was refused: "returned no grads")."""
    torch.manual_seed(0)
    model = Attending()
    if wrap == "weight_norm":
        weight_norm(model.attention.out_proj)
    else:
        parametrize.register_parametrization(model.attention.out_proj, "weight", Scaled(4))
    x = torch.randn(3, 5, 4, dtype=D)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: no batching rule for weight_norm's backward
        indigrad.testing.check(model, lambda x: model(x).square().sum(1), x)


def test_spectral_norm_in_training_mode_keeps_the_forward_s_vectors():
    """In training mode the power iteration steps once per forward; the chain rule runs the
    parametrization in eval mode, on the vectors that forward used, and does not step."""
    torch.manual_seed(0)
    model = nn.Sequential(spectral_norm(nn.Linear(4, 4).double()), nn.Linear(4, 3).double())
    x, y = torch.randn(3, 4, dtype=D), torch.tensor([0, 2, 1])
    plist = model[0].parametrizations.weight
    params = dict(model.named_parameters())
    with indigrad.capture(model) as cap:
        losses = F.cross_entropy(model(x), y, reduction="none")
        u = plist[0]._u.clone()
        batch = torch.autograd.grad(losses.sum(), list(params.values()), retain_graph=True)
        grads = cap.grads(losses)
    assert torch.equal(plist[0]._u, u) and plist.training
    for k, g in zip(params, batch, strict=True):  # the same forward's gradient
        torch.testing.assert_close(grads[k].sum(0), g, msg=k)


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm"])
def test_the_hook_forms_are_refused(kind):
    torch.manual_seed(0)
    with pytest.warns(FutureWarning) if kind == "weight_norm" else contextlib.nullcontext():
        layer = getattr(torch.nn.utils, kind)(nn.Linear(4, 3).double())
    model = nn.Sequential(layer)
    with pytest.raises(RuntimeError, match=f"parametrizations.{kind}"), indigrad.capture(model):
        pass
