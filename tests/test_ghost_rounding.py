"""Ghost norms where the positions' contributions cancel (``indigrad/rules/_ghost.py``).

Each model takes, per example, inputs at two positions whose contributions to a gradient
nearly cancel: ``a`` and ``-(1 - δ) a`` with the same output gradient. The Grams' sum is
then a small difference of large terms. In float32 the norm must never come out short of
the true one (computed in float64 by the loop), nor NaN, so that no example escapes its
clipping; where nothing cancels, the guard changes nothing.
"""

import copy
import subprocess
import sys

import pytest
import torch
from torch import Tensor, nn

import indigrad
from indigrad.rules import _ghost
from indigrad.testing import loop_grads, norms_of

N, D = 6, 32


def _cancelling(delta: float, *shape: int) -> Tensor:
    """``(N, 2, *shape)``: per example a random ``a``, then ``-(1 - δ) a``."""
    g = torch.Generator().manual_seed(0)
    a = 1e3 * torch.randn(N, 1, *shape, generator=g)
    return torch.cat([a, -(1 - delta) * a], 1)


class Tokens(nn.Module):
    """A Linear over two tokens; the loss is the sum of both tokens' outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D, bias=False)

    def forward(self, x: Tensor) -> Tensor:  # x (n, 2, D)
        return self.lin(x).sum(1)  # (n, D): one output gradient for both tokens


class Positions(nn.Module):
    """A 1×1 conv over two positions, summed over them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(D, D, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:  # x (n, 2, D)
        return self.conv(x.transpose(1, 2)).sum(2)  # (n, D)


class Twice(nn.Module):
    """One Linear applied to each token: a parameter of two uses (``rules/tied.py``)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D, bias=False)

    def forward(self, x: Tensor) -> Tensor:  # x (n, 2, D)
        return self.lin(x[:, 0]) + self.lin(x[:, 1])  # (n, D)


class Lookups(nn.Module):
    """Two lookups of the same row, their outputs weighted 1 and -(1 - δ)."""

    def __init__(self, delta: float) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, D)
        self.delta = delta

    def forward(self, ids: Tensor) -> Tensor:  # ids (n, 2)
        e = self.emb(ids)  # (n, 2, D)
        return 1e3 * (e[:, 0] - (1 - self.delta) * e[:, 1])  # (n, D)


def _problem(kind: str, delta: float):
    torch.manual_seed(0)
    v = torch.randn(D)
    if kind == "embedding":
        model: nn.Module = Lookups(delta)
        x = torch.randint(0, 10, (N, 1)).expand(N, 2).contiguous()  # one row, twice
    else:
        model = {"linear": Tokens, "conv": Positions, "tied": Twice}[kind]()
        x = _cancelling(delta, D)

    def losses_of(m: nn.Module):
        return lambda x: (lambda out: out @ v.to(out))(m(x))  # (n,)

    return model, losses_of, x


@pytest.mark.parametrize("kind", ["linear", "conv", "tied", "embedding"])
@pytest.mark.parametrize("delta", [1e-2, 1e-4, 1e-6])
def test_no_norm_short_of_the_true_one(kind, delta):
    model, losses_of, x = _problem(kind, delta)
    exact = copy.deepcopy(model).double()
    true = norms_of(loop_grads(exact, losses_of(exact), x if kind == "embedding" else x.double()))
    with indigrad.capture(model) as cap:
        per_example = cap.backward(losses_of(model)(x))
        norms = per_example.norms()
        per_example.clip_(1.0)
    assert torch.isfinite(norms).all()
    assert (norms.double() >= true * (1 - 1e-3)).all(), (norms, true)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("kind", ["linear", "conv", "tied", "embedding"])
def test_nothing_raised_where_nothing_cancels(kind):
    model, losses_of, _ = _problem(kind, 0.5)
    x = (
        torch.randint(0, 10, (N, 2))
        if kind == "embedding"
        else torch.randn(N, 2, D, generator=torch.Generator().manual_seed(1))
    )
    exact = copy.deepcopy(model).double()
    true = norms_of(loop_grads(exact, losses_of(exact), x if kind == "embedding" else x.double()))
    with indigrad.capture(model) as cap:
        norms = cap.norms(losses_of(model)(x))
    torch.testing.assert_close(norms.double(), true, rtol=1e-5, atol=0)


@pytest.fixture
def lowered_float32_products(request, monkeypatch):
    """Float32 matrix products at reduced precision on the device: TF32 on a CUDA device
    (set as most programs set it); on the CPU, which cannot lower them here, the setting
    is what ``_ghost`` reads, with the products left in float32."""
    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA device")
        saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        yield "cuda"
        torch.backends.cuda.matmul.allow_tf32 = saved
    else:
        monkeypatch.setattr(_ghost, "_precision", lambda backend: "bf16")
        yield "cpu"


@pytest.mark.parametrize("lowered_float32_products", ["cpu", "cuda"], indirect=True)
@pytest.mark.parametrize("kind", ["linear", "conv", "tied", "embedding"])
@pytest.mark.parametrize("delta", [1e-2, 1e-4])
def test_grams_in_float64_where_float32_products_are_lowered(kind, delta, lowered_float32_products):
    """With TF32 (u = 2⁻¹¹) the guard's float32 bound would be far too small; with the
    Grams in float64 the norms are exact, where float32 Grams would have been raised."""
    device = lowered_float32_products
    model, losses_of, x = _problem(kind, delta)
    exact = copy.deepcopy(model).double()
    true = norms_of(loop_grads(exact, losses_of(exact), x if kind == "embedding" else x.double()))
    model, x = model.to(device), x.to(device)
    with indigrad.capture(model) as cap:
        norms = cap.norms(losses_of(model)(x))
    assert norms.dtype == torch.float32
    # the embedding's output gradients, 1e3·v and -(1 - δ)·1e3·v, are rounded in float32
    # by the backward itself: their sum is known to u/δ (2·10⁻⁴ at δ = 10⁻⁴), as in any
    # float32 computation of this gradient; the other models' gradients are exact
    rtol = 1e-3 if kind == "embedding" else 1e-5
    torch.testing.assert_close(norms.cpu().double(), true, rtol=rtol, atol=0)


def test_the_scale_is_that_of_the_grams_dtype():
    assert _ghost.scale(torch.float64, 4, 4, 2) < _ghost.scale(torch.float32, 4, 4, 2) < 1e-3
    assert _ghost.scale(torch.bfloat16, 4, 4, 2) is None


def test_the_bound_is_the_diagonals_sum_scaled():
    """``guarded_sum`` keeps ``max(Σ Z, c Σ_t Z_tt)``: with ``c`` near 1 (wide Grams),
    some rows keep their sum and others the bound."""
    g = torch.Generator().manual_seed(0)
    m, T, a, b = 6, 7, 10**8, 10**8
    Z = torch.randn(m, T, T, generator=g)  # (m, T, T)
    Z.diagonal(dim1=1, dim2=2).abs_().add_(1)  # V > 0
    c = _ghost.scale(torch.float32, a, b, T)
    assert c is not None and 0.5 < c < 2
    expected = torch.maximum(Z.sum((1, 2)), c * Z.diagonal(dim1=1, dim2=2).sum(1))  # (m,)
    kept_bound = expected > Z.sum((1, 2))
    assert kept_bound.any() and not kept_bound.all()
    torch.testing.assert_close(_ghost.guarded_sum(Z, a, b), expected)
    assert torch.equal(_ghost.guarded_sum(Z.half(), a, b), Z.half().sum((1, 2)))  # unguarded


def test_an_example_whose_grams_overflow_is_dropped_not_nan():
    """Example 1's inputs overflow its float32 Grams: its norm is infinite and it adds
    nothing to the clipped sum, which stays finite for the others (a NaN norm would make
    every ``.grad`` NaN)."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 64, bias=False)
    x = torch.randn(3, 4, 64)  # (n, T, d): four tokens, the ghost norm's shapes
    x[1] = x[1].abs() * 1e18  # example 1: all positive, its Grams overflow to inf
    with indigrad.capture(lin) as cap:
        per_example = cap.backward(lin(x).sum((1, 2)))
        norms = per_example.norms()
        per_example.clip_(1.0)
    assert torch.isinf(norms[1]) and torch.isfinite(norms[[0, 2]]).all()
    exact = copy.deepcopy(lin).double()
    others = x[[0, 2]].double()  # (2, T, d)
    g = loop_grads(exact, lambda x: exact(x).sum((1, 2)), others)["weight"]  # (2, 64, 64)
    coef = (1.0 / norms_of({"weight": g})).clamp(max=1.0)  # (2,)
    torch.testing.assert_close(lin.weight.grad.double(), torch.einsum("i,ioj->oj", coef, g))


@pytest.mark.parametrize("T", [3, 300])  # the cached weights, and the sums beyond them
def test_guarded_sum_either_side_of_the_cached_sizes(T):
    g = torch.Generator().manual_seed(1)
    Z = torch.randn(4, T, T, generator=g)  # (m, T, T)
    Z.diagonal(dim1=1, dim2=2).abs_().add_(1)
    a = b = 10**8  # c near 1
    c = _ghost.scale(torch.float32, a, b, T)
    expected = torch.maximum(Z.sum((1, 2)), c * Z.diagonal(dim1=1, dim2=2).sum(1))  # (m,)
    _ghost._cached_weights.cache_clear()
    torch.testing.assert_close(_ghost.guarded_sum(Z, a, b), expected)
    assert _ghost._cached_weights.cache_info().currsize == (T <= _ghost._CACHED_T)
    Z[0, 0, 1] = Z[0, 0, 0] = float("inf")  # overflowed: inf · 0 is NaN in the weights' product
    Z[1, 0, 0] = float("nan")  # a NaN stays NaN
    out = _ghost.guarded_sum(Z, a, b)  # (m,)
    assert torch.isposinf(out[0]) and torch.isnan(out[1]) and torch.isfinite(out[2:]).all()


@pytest.mark.parametrize(
    "setting, lowered",
    [
        ("pass", False),
        ("torch.set_float32_matmul_precision('high')", True),
        ("torch.backends.mkldnn.matmul.fp32_precision = 'bf16'", True),
        ("torch.backends.fp32_precision = 'tf32'", True),
        ("torch.backends.cuda.matmul.allow_tf32 = True", False),  # the GPU's alone
    ],
)
def test_lowered_products_are_read_from_every_way_of_setting_them(setting, lowered):
    """Each way a program lowers float32 products, in a fresh process (PyTorch refuses to
    read some settings once the legacy and the new ways are mixed): ``_ghost`` reads the
    CPU's setting without raising, and the norms stay exact."""
    script = f"""
import torch
{setting}
from indigrad.rules import _ghost
import indigrad
print(_ghost.reduced(torch.ones(1)))
lin = torch.nn.Linear(8, 8, bias=False)
x = torch.randn(4, 3, 8)
with indigrad.capture(lin) as cap:
    norms = cap.norms(lin(x).sum((1, 2)))
print(norms.dtype)
"""
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()
    assert out == [str(lowered), "torch.float32"]
