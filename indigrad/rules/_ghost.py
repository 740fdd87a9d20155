"""Ghost norms and their rounding: a bound where the Grams cannot give the norm.

A ghost squared norm, ``‖Σ_t L_t ⊗ R_t‖² = Σ_ts (L_t · L_s)(R_t · R_s) = ⟨X, Y⟩`` with the
Grams ``X = L Lᵀ`` and ``Y = R Rᵀ`` (T × T, their entries dot products of widths ``a`` and
``b``), sums T² products. Where the positions' contributions to the gradient cancel, so that
``‖Σ_t L_t ⊗ R_t‖`` is far below ``Σ_t ‖L_t‖ ‖R_t‖``, the sum is a small difference of
large terms, and its rounding error can exceed it: the squared norm comes out too small,
zero or negative, and the example would escape its clipping. (A materialised gradient
rounds relative to the gradient itself, as the plain backward does, and has no such
problem.)

Taking rounding errors as independent, the computed sum is off by about

    Ê = u (√a + √b + T) V,     V = Σ_t X_tt Y_tt = Σ_t ‖L_t‖² ‖R_t‖²

(``u`` the unit roundoff of the Grams' dtype): the Grams' entries err by ``√a u`` and
``√b u`` of the norms they multiply, the sum of T² products by ``T u``. A computed squared
norm of at least ``κ Ê`` (``_KAPPA`` = 1000) is then right to 0.1 %; a smaller one is not
known to that, and is raised to ``κ Ê``, which exceeds the true value less what it is
off by (``S + Ê < κ Ê + Ê``). Either way the example's clipping factor comes from a norm
at most 0.05 % short of its own: an example whose gradient cancels is clipped more, never
less. Values below ``κ Ê`` do not occur otherwise: for positions that do not cancel,
``⟨X, Y⟩`` is of the order of ``V``, and ``κ u (√a + √b + T)`` is 0.07 in float32 at
T = 1024, a = b = 512. Half-precision Grams are left as they are (their rounding is
that of the dtype, as documented).

    >>> import torch
    >>> a = torch.randn(1, 1, 64)
    >>> L = torch.cat([a, -a * (1 - 1e-5)], 1)      # (1, 2, 64): two positions that cancel
    >>> R = torch.ones(1, 2, 8)
    >>> X, Y = L @ L.transpose(1, 2), R @ R.transpose(1, 2)
    >>> exact = (L.double().transpose(1, 2) @ R.double()).square().sum()
    >>> bool(guarded((X * Y).sum((1, 2)), X, Y, 64, 8) >= exact * (1 - 1e-3))
    True
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_KAPPA = 1000.0
_GUARDED = (torch.float32, torch.float64)


def scale(dtype: torch.dtype, a: int, b: int, T: int) -> float | None:
    """``κ u (√a + √b + T)``, the multiple of ``V`` below which a ghost squared norm is
    raised; None for dtypes left unguarded."""
    if dtype not in _GUARDED:
        return None
    u = torch.finfo(dtype).eps / 2
    return _KAPPA * u * (math.sqrt(a) + math.sqrt(b) + T)


def diagonal_dot(X: Tensor, Y: Tensor) -> Tensor:
    """``V = Σ_t X_tt Y_tt`` of the Grams ``X`` and ``Y`` ``(m, T, T)``: ``(m,)``."""
    return (X.diagonal(dim1=1, dim2=2) * Y.diagonal(dim1=1, dim2=2)).sum(1)  # (m,)


def guarded(S: Tensor, X: Tensor, Y: Tensor, a: int, b: int) -> Tensor:
    """``max(S, κ Ê)`` for the ghost squared norms ``S = ⟨X, Y⟩`` ``(m,)`` of the Grams
    ``X`` and ``Y`` ``(m, T, T)`` (widths ``a`` and ``b``)."""
    c = scale(S.dtype, a, b, X.shape[-1])
    if c is None:
        return S
    return torch.maximum(S, diagonal_dot(X, Y).mul_(c))  # (m,)
