"""``nn.Linear``: ``Z = A Wᵀ + b`` on inputs ``(n, *, d_in)``.

With the extra dims flattened to ``T`` (tokens, positions; ``T = 1`` without any):

    grads        dW_i = Σ_t G_it ⊗ A_it                   einsum("nto,nti->noi")
                 db_i = Σ_t G_it                           einsum("nto->no")
    sq_norms     T = 1:  ‖dW_i‖² = ‖G_i‖² ‖A_i‖²            (Goodfellow)
                 T > 1:  ‖dW_i‖² = ⟨A_i A_iᵀ, G_i G_iᵀ⟩      (ghost, T×T Grams) when
                         T (d_in + d_out) < d_in d_out, else materialise dW_i;
                         a ghost value within its rounding is raised (``_ghost``)
    weighted_sum Σ_i c_i dW_i = (c ⊙ G)ᵀ A over all (i, t)  einsum("n,nto,nti->oi")

For a clipped sum with T > 1, ``dW_i`` may instead be materialised once and both the norm
and the weighted sum taken from it, by the cost choice of ``_cost.materialise_to_clip``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .. import _alloc, _outer
from . import _cost, _ghost
from .registry import register_rule


def _check(module: nn.Module, A: Tensor, G: Tensor) -> None:
    if A.shape[:-1] != G.shape[:-1]:
        raise RuntimeError(
            f"{type(module).__name__}: input {tuple(A.shape)} and output gradient "
            f"{tuple(G.shape)} disagree on their batch and extra dims"
        )


def _flat(module: nn.Module, inputs: tuple[Any, ...], G: Tensor) -> tuple[Tensor, Tensor]:
    A = inputs[0]  # (n, *, d_in)
    _check(module, A, G)
    if A.dim() != 3:  # already (n, T, d): no view to make (each costs the host a call)
        n, T = A.shape[0], math.prod(A.shape[1:-1])
        A = A.reshape(n, T, A.shape[-1])  # (n, T, d_in)
        G = G.reshape(n, T, G.shape[-1])  # (n, T, d_out)
    return A, G


def _outer_products(L: Tensor, R: Tensor) -> Tensor:
    """Per example ``Σ_t L_t ⊗ R_t``: (n, T, a), (n, T, b) -> (n, a, b), in a fresh buffer."""
    n, T, a = L.shape
    if T == 1:
        return _outer_rows(L.reshape(n, a), R.reshape(n, R.shape[2]))
    return _alloc.bmm(L.transpose(1, 2), R)  # (n, a, T) @ (n, T, b)


def _outer_rows(L: Tensor, R: Tensor) -> Tensor:
    """Per example ``L_i ⊗ R_i``: (n, a), (n, b) -> (n, a, b), in a fresh buffer."""
    n, a = L.shape
    device = R.device.type
    W = _alloc.empty((n, a, R.shape[1]), like=R)  # (n, a, b)
    if device in _outer.DEVICES and _outer.outer(L, R, W):
        return W  # Triton's kernel (CUDA)
    if device == "cpu":  # a GPU writes W faster as a GEMM (H200: 1.5×)
        return torch.mul(L[:, :, None], R[:, None, :], out=W)  # (n, a, 1) * (n, 1, b)
    return torch.bmm(L[:, :, None], R[:, None, :], out=W)  # the kernel declined: into W


def linear_grads(module: nn.Module, inputs: tuple[Any, ...], G: Tensor) -> dict[str, Tensor]:
    out = {}
    if inputs[0].dim() == 2:  # T = 1, the plain MLP: no views to make, each a host call
        _check(module, inputs[0], G)
        out["weight"] = _outer_rows(G, inputs[0])  # (n, d_out, d_in)
        if module.bias is not None:
            out["bias"] = G.clone(memory_format=torch.contiguous_format)  # (n, d_out)
        return out
    A, G = _flat(module, inputs, G)  # (n, T, d_in), (n, T, d_out)
    out["weight"] = _outer_products(G, A)  # (n, d_out, d_in)
    if module.bias is not None:
        out["bias"] = G.sum(1)  # (n, d_out)
    return out


def linear_materialise(
    module: nn.Module, inputs: tuple[Any, ...], G: Tensor, clipping: bool
) -> bool:
    A = inputs[0]  # (n, *, d_in)
    T = math.prod(A.shape[1:-1])
    return clipping and T > 1 and _cost.materialise_to_clip(T, G.shape[-1], A.shape[-1], G.device)


def _sq_rows(t: Tensor) -> Tensor:
    return torch.linalg.vector_norm(t, dim=1).square()  # (n,): no (n, d) temporary


def linear_sq_norms(module: nn.Module, inputs: tuple[Any, ...], G: Tensor) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    weight = module.weight.requires_grad
    bias = module.bias is not None and module.bias.requires_grad
    if inputs[0].dim() == 2:  # T = 1, the plain MLP: few ops, as these layers are cheap
        _check(module, inputs[0], G)
        gg = _sq_rows(G)  # (n,) ‖G_i‖²
        if weight:
            out["weight"] = gg * _sq_rows(inputs[0])  # (n,) ‖G_i‖² ‖A_i‖²
        if bias:
            out["bias"] = gg  # (n,)
        return out
    A, G = _flat(module, inputs, G)  # (n, T, d_in), (n, T, d_out)
    _n, T, d_in = A.shape
    d_out = G.shape[2]
    if weight:
        if T == 1:
            out["weight"] = _sq_rows(G[:, 0]) * _sq_rows(A[:, 0])  # (n,)
        elif _cost.ghost_norm(T, d_out, d_in):  # two (n, T, T) Grams
            out["weight"] = _ghost.sq_norms(A.transpose(1, 2), G.transpose(1, 2))  # (n,)
        else:
            W = _outer_products(G, A)  # (n, d_out, d_in)
            out["weight"] = torch.linalg.vector_norm(W, dim=(1, 2)).square()  # (n,)
    if bias:  # from Σ_t G_it itself, not from G's Gram, whose sum cancels (rules/_ghost.py)
        out["bias"] = _sq_rows(G.sum(1))  # (n,)
    return out


def linear_weighted_sum(
    module: nn.Module, inputs: tuple[Any, ...], G: Tensor, coef: Tensor
) -> dict[str, Tensor]:
    A = inputs[0]  # (n, *, d_in)
    _check(module, A, G)
    c = coef if coef.dtype == G.dtype else coef.to(G.dtype)  # (n,)
    scale = c.view(-1, *[1] * (A.dim() - 1))  # (n, 1, …): c_i for each of example i's rows
    weight = module.weight.requires_grad
    bias = module.bias is not None and module.bias.requires_grad
    out = {}
    if weight and G.shape[-1] <= A.shape[-1]:
        # c_i G_it as an (n·T, d_out) matrix: its column sums are the bias's sum
        Gc = _rows(G * scale)  # (n·T, d_out)
        out["weight"] = torch.mm(Gc.t(), _rows(A))  # (d_out, d_in)
        if bias:
            out["bias"] = Gc.sum(0)  # (d_out,)
        return out
    if weight:  # a wide output (a language model's head): scale A, not a copy of G
        out["weight"] = torch.mm(_rows(G).t(), _rows(A * scale))  # (d_out, d_in)
    if bias:  # no copy of G for the bias alone either
        out["bias"] = torch.mv(_summed_positions(G).t(), c)  # (d_out, n) @ (n,)
    return out


def _rows(t: Tensor) -> Tensor:
    """``(n, *, d)`` as an ``(n·T, d)`` matrix: itself where it has no extra dims (no view
    to make, each a call on the host)."""
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def _summed_positions(G: Tensor) -> Tensor:
    """``Σ_t G_it``: ``(n, d)``, ``G`` itself where it has no extra dims."""
    if G.dim() == 2:
        return G
    if G.dim() > 3:
        G = G.flatten(1, -2)  # (n, T, d)
    return G.sum(1)


LINEAR = register_rule(
    nn.Linear,
    grads=linear_grads,
    sq_norms=linear_sq_norms,
    weighted_sum=linear_weighted_sum,
    materialise=linear_materialise,
)


# Hugging Face's ``Conv1D`` (GPT-2): ``Z = A W + b`` with ``W`` of shape (d_in, d_out), the
# transpose of Linear's. Same math, the weight gradient laid out as (n, d_in, d_out).


def conv1d_grads(module: nn.Module, inputs: tuple[Any, ...], G: Tensor) -> dict[str, Tensor]:
    A, G = _flat(module, inputs, G)  # (n, T, d_in), (n, T, d_out)
    out = {"weight": _outer_products(A, G)}  # (n, d_in, d_out)
    if module.bias is not None:
        out["bias"] = G.sum(1)  # (n, d_out)
    return out


def conv1d_weighted_sum(
    module: nn.Module, inputs: tuple[Any, ...], G: Tensor, coef: Tensor
) -> dict[str, Tensor]:
    out = linear_weighted_sum(module, inputs, G, coef)
    if "weight" in out:
        out["weight"] = out["weight"].T.contiguous()  # (d_in, d_out)
    return out


HF_CONV1D = register_rule(
    "transformers.pytorch_utils.Conv1D",
    grads=conv1d_grads,
    sq_norms=linear_sq_norms,  # ‖W‖ does not depend on the layout
    weighted_sum=conv1d_weighted_sum,
    materialise=linear_materialise,
)
