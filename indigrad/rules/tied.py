"""A parameter used by several calls (tied weights, a layer applied twice): the norms of
its per-example gradient ``g_i = Σ_u g^u_i`` (one term per use) without materialising it.

Each use's gradient is a sum of outer products over its ``T_u`` positions,
``g^u_i = Σ_t L^u_it ⊗ R^u_it``:

    Linear weight (out, in)     L = G (n, T, out)            R = A (n, T, in)
    Linear bias (out,)          L = G                        R = 1 (marked, not stored)
    Conv1D weight (in, out)     L = A                        R = G         (Hugging Face)
    Embedding weight (V, d)     L = one-hot of the ids       R = G (n, T, d), 0 at padding

so that, as the ghost norm of one use,

    ‖g_i‖² = Σ_{u,v} ⟨g^u_i, g^v_i⟩ = Σ_{u,v} Σ_{t,s} (L^u_it · L^v_is) (R^u_it · R^v_is)

takes one T_u × T_v Gram of each side per pair of uses. A one-hot side needs no product:
against a dense ``L`` it gathers ``L^v_is[id_t]``, against another one-hot it compares ids.
A language model whose head shares the token embedding's (V, d) weight then never holds
the per-example (V, d) gradients of either use.

The Grams are taken where they are smaller than the gradient, ``(Σ_u T_u)² < out · in``
elements per example; otherwise (a small weight reused at many positions) the gradients
are materialised and summed, as for uses of any other layer. A shared bias needs no
Gram: its gradient ``Σ_u Σ_t G^u_it`` is as small as the bias.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from . import _ghost
from .embedding import EMBEDDING, _embedding_flat
from .linear import HF_CONV1D, LINEAR, _flat
from .registry import Rule


class Factors(NamedTuple):
    """``g_i = Σ_t L_it ⊗ R_it``: ``L`` (n, T, a) dense, or the ids (n, T) of a one-hot
    ``L`` (``onehot``), and ``R`` (n, T, b), or None for a bias (``R = 1``; a weight's
    ``R`` may have width 1 too, so a bias is marked, not told by its shape)."""

    L: Tensor
    R: Tensor | None
    onehot: bool = False


def _linear(module: nn.Module, inputs: tuple[Any, ...], G: Tensor, local: str) -> Factors:
    A, G = _flat(module, inputs, G)  # (n, T, in), (n, T, out)
    return Factors(G, None if local == "bias" else A)


def _conv1d(module: nn.Module, inputs: tuple[Any, ...], G: Tensor, local: str) -> Factors:
    f = _linear(module, inputs, G, local)
    return f if f.R is None else Factors(f.R, f.L)  # the weight is (in, out)


def embedding_factors(module: nn.Module, inputs: tuple[Any, ...], G: Tensor, local: str) -> Factors:
    ids, G = _embedding_flat(module, inputs, G)  # (n, T), (n, T, d)
    pad = getattr(module, "padding_idx", None)
    if pad is not None:
        G = G * (ids != pad)[:, :, None]  # (n, T, d): the padding row gets no gradient
    return Factors(ids, G, onehot=True)


FactorsFn = Callable[[nn.Module, tuple[Any, ...], Any, str], Factors]
FACTORS: dict[Rule, FactorsFn] = {LINEAR: _linear, HF_CONV1D: _conv1d, EMBEDDING: embedding_factors}


def _gram_left(u: Factors, v: Factors, dtype: torch.dtype) -> Tensor:
    """``(n, T_u, T_v)``: ``L^u_t · L^v_s``."""
    if u.onehot and v.onehot:
        return (u.L[:, :, None] == v.L[:, None, :]).to(dtype)
    if u.onehot:  # L^v_s[id_t]
        T = u.L.shape[1]
        index = u.L[:, None, :].expand(-1, v.L.shape[1], T)  # (n, T_v, T_u)
        return torch.gather(v.L, 2, index).transpose(1, 2)
    if v.onehot:
        return _gram_left(v, u, dtype).transpose(1, 2)
    return torch.bmm(u.L, v.L.transpose(1, 2))


def _double(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.double()


def sq_norms(uses: list[Factors], size: int) -> Tensor | None:
    """``(n,)``: ``‖Σ_u g^u_i‖²`` from each use's factors (``size``: the parameter's
    elements), or None where the Grams would be larger than the gradient."""
    rights = [f.R for f in uses]
    if all(R is None for R in rights):  # a bias: Σ_u Σ_t G^u_it
        g = uses[0].L.sum(1)  # (n, out)
        for f in uses[1:]:
            g = g + f.L.sum(1)
        return g.square().sum(1)
    positions = sum(f.L.shape[1] for f in uses)
    if any(R is None for R in rights) or positions**2 >= size:
        return None  # (one parameter is a bias in all its uses or in none)
    # the cross terms' Grams err by their uses' norms: Ê ≤ u (√a + √b + T) (Σ_u √V_u)²
    a = max(0 if f.onehot else f.L.shape[2] for f in uses)
    R = uses[0].R
    assert R is not None
    dtype = R.dtype
    if _ghost.reduced(R):  # float32 products lowered: the Grams in float64
        uses = [f._replace(L=f.L if f.onehot else f.L.double(), R=_double(f.R)) for f in uses]
        R = R.double()
    b = max(f.R.shape[2] for f in uses if f.R is not None)
    c = _ghost.scale(R.dtype, a, b, positions)  # None: Grams of a dtype left unguarded
    total = root_v = None  # root_v (n,): Σ_u √V_u, the scale of the sum's rounding
    for j, u in enumerate(uses):
        for k in range(j, len(uses)):
            v = uses[k]
            assert u.R is not None and v.R is not None
            RR = torch.bmm(u.R, v.R.transpose(1, 2))  # (n, T_u, T_v)
            LL = _gram_left(u, v, RR.dtype)  # (n, T_u, T_v)
            term = (LL * RR).sum((1, 2))  # (n,) ⟨g^u_i, g^v_i⟩
            if k == j and c is not None:  # V_u = Σ_t ‖L^u_t‖² ‖R^u_t‖²
                root = _ghost.diagonal_dot(LL, RR).sqrt()  # (n,)
                root_v = root if root_v is None else root_v + root
            term = term if k == j else 2 * term  # ⟨g^u, g^v⟩ = ⟨g^v, g^u⟩
            total = term if total is None else total + term
    assert total is not None
    if c is None or root_v is None:
        return total.to(dtype)
    return torch.maximum(total, root_v.square_().mul_(c)).to(dtype)
