"""The model zoo: small named problems that the tests parametrise over.

Each case builds a model and a batch, and says how to turn them into per-example losses.
Everything is built in float64 by default; ``Case.build(dtype)`` casts model and inputs.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SeedMLP(nn.Module):
    """The seed's model, unchanged: hidden Linear layers with ReLU, one output."""

    def __init__(self, input_size: int, hidden_sizes: list[int]) -> None:
        super().__init__()
        self.act = F.relu
        self.hidden_layers = nn.ModuleList(
            [
                nn.Linear(i, o)
                for i, o in zip([input_size, *hidden_sizes[:-1]], hidden_sizes, strict=True)
            ]
        )
        self.output_layer = nn.Linear(hidden_sizes[-1], 1)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.hidden_layers:
            x = self.act(layer(x))
        return self.output_layer(x)


class TwiceApplied(nn.Module):
    """One Linear layer applied twice (its weight gets the sum of both uses)."""

    def __init__(self, d: int, k: int) -> None:
        super().__init__()
        self.inp = nn.Linear(d, 6)
        self.shared = nn.Linear(6, 6)
        self.out = nn.Linear(6, k)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.shared(h))
        return self.out(h)


class TiedWeights(nn.Module):
    """Two Linear modules sharing one weight (and not their biases)."""

    def __init__(self, d: int, k: int) -> None:
        super().__init__()
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, d)
        self.b.weight = self.a.weight
        self.out = nn.Linear(d, k)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.b(torch.tanh(self.a(x)))))


class Scale(nn.Module):
    """A custom layer without a rule: ``x * s + shift`` (the generic rule)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.linspace(0.5, 1.5, d))
        self.shift = nn.Parameter(torch.linspace(-0.1, 0.1, d))

    def forward(self, x: Tensor) -> Tensor:
        assert x.dim() >= 2, "sees a batch, of one under the generic rule"
        return x * self.s + self.shift


class RawParams(nn.Module):
    """Raw parameters next to children: a class token and a gain used in forward."""

    def __init__(self, d: int, k: int) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.randn(1, 1, d))
        self.gain = nn.Parameter(torch.ones(d))
        self.scale = Scale(d)
        self.proj = nn.Linear(d, d)
        self.head = nn.Linear(d, k)

    def forward(self, x: Tensor) -> Tensor:  # x (n, T, d)
        tok = self.token.expand(x.shape[0], 1, -1)  # (n, 1, d)
        h = torch.cat([tok, x], dim=1)  # (n, T+1, d)
        h = torch.tanh(self.proj(self.scale(h))) * self.gain
        return self.head(h[:, 0])


class RecurrentInside(nn.Module):
    """A module without a rule around an LSTM and a GRU, using its own parameter through
    functions the direct rules do not cover: the generic rule re-runs it for each example,
    recurrent layers and all, whose fused kernels vmap cannot batch (one example after
    another instead)."""

    def __init__(self, d: int, h: int, k: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(d, h, batch_first=True)
        self.gru = nn.GRU(h, h, batch_first=True)
        self.gain = nn.Parameter(torch.linspace(-0.5, 0.5, h))
        self.head = nn.Linear(h, k)

    def forward(self, x: Tensor) -> Tensor:  # x (n, T, d)
        h, _ = self.lstm(x)  # (n, T, h)
        h, _ = self.gru(torch.tanh(h * self.gain.exp()))  # (n, T, h)
        return self.head(h[:, -1] * torch.sigmoid(self.gain))  # (n, k)


class CellLoop(nn.Module):
    """An ``nn.LSTMCell`` unrolled over the sequence: the generic rule re-runs each call,
    whose two outputs depend on each other (``h`` is computed from the returned ``c``)."""

    def __init__(self, d: int, h: int, k: int) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(d, h)
        self.head = nn.Linear(h, k)

    def forward(self, x: Tensor) -> Tensor:  # x (n, T, d)
        state = None
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)  # (h, c), each (n, h)
        return self.head(state[0] + 0.5 * state[1])  # (n, k)


class Linked(nn.Module):
    """A module without a rule returning one output twice and another computed from it."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(-1, 1, d * d).reshape(d, d))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # x (n, d)
        h = torch.tanh(x @ self.w.exp())  # (n, d)
        return h, h.square().sum(1, keepdim=True), h  # (n, d), (n, 1), (n, d)


class LinkedNet(nn.Module):
    def __init__(self, d: int, k: int) -> None:
        super().__init__()
        self.linked = Linked(d)
        self.head = nn.Linear(d, k)

    def forward(self, x: Tensor) -> Tensor:  # x (n, d)
        h, s, again = self.linked(x)
        return self.head(h * s + again.sin())  # (n, k)


class Masked(nn.Module):
    """A custom layer called with a keyword and an unbatched argument (generic rule)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(-1, 1, d * d).reshape(d, d))

    def forward(self, x: Tensor, *, mask: Tensor, power: int = 1) -> Tensor:  # x (n, T, d)
        return (x @ (self.w * mask)) ** power


class MaskedNet(nn.Module):
    def __init__(self, d: int, k: int) -> None:
        super().__init__()
        self.register_buffer("mask", torch.tril(torch.ones(d, d)))
        self.masked = Masked(d)
        self.head = nn.Linear(d, k)

    def forward(self, x: Tensor) -> Tensor:
        h = self.masked(x, mask=self.mask, power=3)
        return self.head(h).mean(1)


class KeywordLinear(nn.Module):
    def __init__(self, d: int, k: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, k)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(input=x)


def _mlp(*sizes: int, act: type[nn.Module] = nn.Tanh, bias: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def _frozen_first() -> nn.Module:
    model = _mlp(5, 7, 3)
    model[0].requires_grad_(False)
    return model


def _frozen_bias() -> nn.Module:
    model = _mlp(5, 7, 3)
    model[2].bias.requires_grad_(False)
    return model


def _inplace_relu() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(inplace=True), nn.Linear(8, 3))


def _eval_dropout() -> nn.Module:
    model = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 3))
    return model.eval()


def _generic_scale() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 4), Scale(4), nn.Tanh(), nn.Linear(4, 3))


def _ce(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(model(x), y, reduction="none")  # (n,)


def _bce(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(model(x), y, reduction="none")  # (n, 1)


def _token_ce(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    logits = model(x)  # (n, *, k)
    return F.cross_entropy(logits.movedim(-1, 1), y, reduction="none")  # (n, *)


def _seq_first_ce(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    logits = model(x)  # (T, n, k)
    return F.cross_entropy(logits.permute(1, 2, 0), y.T, reduction="none")  # (n, T)


def _classes(n: int, k: int, *extra: int) -> Callable[[torch.Generator], Tensor]:
    return lambda g: torch.randint(0, k, (n, *extra), generator=g)


@dataclass(frozen=True)
class Case:
    name: str
    model: Callable[[], nn.Module]
    x_shape: tuple[int, ...]
    target: Callable[[torch.Generator], Tensor]
    loss: Callable[[nn.Module, Tensor, Tensor], Tensor]
    batch_dim: int = 0

    def build(self, dtype: torch.dtype = torch.float64, seed: int = 0) -> tuple[Any, ...]:
        """``(model, loss_fn, x, y)`` with ``loss_fn(x, y) -> per-example losses``."""
        torch.manual_seed(seed)
        model = self.model().to(dtype)
        g = torch.Generator().manual_seed(seed + 1)
        x = torch.randn(self.x_shape, generator=g, dtype=dtype)
        y = self.target(g)
        if y.is_floating_point():
            y = y.to(dtype)

        def loss_fn(x: Tensor, y: Tensor) -> Tensor:
            return self.loss(model, x, y)

        return model, loss_fn, x, y


def _binary(n: int) -> Callable[[torch.Generator], Tensor]:
    return lambda g: torch.randint(0, 2, (n, 1), generator=g).double()


CASES = [
    Case("seed_mlp", lambda: SeedMLP(10, [16, 8]), (12, 10), _binary(12), _bce),
    Case("deep_mlp", lambda: _mlp(6, 9, 9, 9, 9, 9, 4), (7, 6), _classes(7, 4), _ce),
    Case("no_bias", lambda: _mlp(6, 8, 3, bias=False), (5, 6), _classes(5, 3), _ce),
    Case("batch_of_one", lambda: _mlp(6, 8, 3), (1, 6), _classes(1, 3), _ce),
    Case("linear_3d_ghost", lambda: _mlp(16, 16, 16), (4, 3, 16), _classes(4, 16, 3), _token_ce),
    Case("linear_3d_materialise", lambda: _mlp(3, 4, 3), (4, 20, 3), _classes(4, 3, 20), _token_ce),
    Case("linear_4d", lambda: _mlp(5, 6, 4), (3, 2, 4, 5), _classes(3, 4, 2, 4), _token_ce),
    Case(
        "seq_first",
        lambda: _mlp(5, 6, 4),
        (7, 3, 5),
        lambda g: torch.randint(0, 4, (7, 3), generator=g),
        _seq_first_ce,
        batch_dim=1,
    ),
    Case(
        "seq_first_generic",
        _generic_scale,
        (7, 3, 5),
        lambda g: torch.randint(0, 3, (7, 3), generator=g),
        _seq_first_ce,
        batch_dim=1,
    ),
    Case("twice_applied", lambda: TwiceApplied(5, 3), (6, 5), _classes(6, 3), _ce),
    Case("tied_weights", lambda: TiedWeights(5, 3), (6, 5), _classes(6, 3), _ce),
    Case("generic_scale", _generic_scale, (6, 5), _classes(6, 3), _ce),
    Case("raw_params", lambda: RawParams(4, 3), (5, 3, 4), _classes(5, 3), _ce),
    Case("generic_kwargs_mask", lambda: MaskedNet(4, 3), (5, 3, 4), _classes(5, 3), _ce),
    Case("generic_around_rnns", lambda: RecurrentInside(3, 4, 3), (5, 6, 3), _classes(5, 3), _ce),
    Case("lstm_cell_loop", lambda: CellLoop(3, 4, 3), (5, 4, 3), _classes(5, 3), _ce),
    Case("generic_linked_outputs", lambda: LinkedNet(4, 3), (5, 4), _classes(5, 3), _ce),
    Case("keyword_call", lambda: KeywordLinear(5, 3), (6, 5), _classes(6, 3), _ce),
    Case("inplace_relu", _inplace_relu, (6, 5), _classes(6, 3), _ce),
    # on tokens a Linear's output is its addmm viewed back, which an in-place op rebuilds
    Case("inplace_relu_tokens", _inplace_relu, (4, 3, 5), _classes(4, 3, 3), _token_ce),
    Case("frozen_first_layer", _frozen_first, (6, 5), _classes(6, 3), _ce),
    Case("frozen_bias", _frozen_bias, (6, 5), _classes(6, 3), _ce),
    Case("eval_dropout", _eval_dropout, (6, 5), _classes(6, 3), _ce),
]

BY_NAME = {case.name: case for case in CASES}
