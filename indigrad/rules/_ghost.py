"""Ghost norms and their rounding: a bound where the Grams cannot give the norm.

A ghost squared norm, ``‖Σ_t L_t ⊗ R_t‖² = Σ_ts (L_t · L_s)(R_t · R_s) = ⟨X, Y⟩`` with the
Grams ``X = L Lᵀ`` and ``Y = R Rᵀ`` (T × T, their entries dot products of widths ``a`` and
``b``), sums T² products. Where the positions' contributions to the gradient cancel, so that
``‖Σ_t L_t ⊗ R_t‖`` is far below ``Σ_t ‖L_t‖ ‖R_t‖``, the sum is a small difference of
large terms, and its rounding error can exceed it: the squared norm comes out too small,
zero or negative, and the example would escape its clipping. (A materialised gradient
rounds as the plain backward's weight gradient does, off by about ``u Σ_t ‖L_t‖ ‖R_t‖``,
and its norm with it: an error that does not grow as the square of how far the positions
cancel.)

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

The bound takes the Grams' rounding to be their dtype's. Float32 matrix products may run
at lower precision where the program allows it (``torch.set_float32_matmul_precision
("high")``, TF32 on a GPU, bf16 on some CPUs: their ``u`` is 2⁻¹¹ or 2⁻⁸, not 2⁻²⁴), and
then the bound would be thousands of times too small, or, taken with their ``u``, flag
every example. Where that setting is on for the tensors' device, ``operands`` hands the
Grams' factors over in float64, and the sites cast their norms back.

    >>> import torch
    >>> a = torch.randn(1, 1, 64)
    >>> L = torch.cat([a, -a * (1 - 1e-5)], 1)      # (1, 2, 64): two positions that cancel
    >>> R = torch.ones(1, 2, 8)
    >>> X, Y = L @ L.transpose(1, 2), R @ R.transpose(1, 2)
    >>> exact = (L.double().transpose(1, 2) @ R.double()).square().sum()
    >>> bool(guarded_sum(X * Y, 64, 8) >= exact * (1 - 1e-3))
    True
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

_KAPPA = 1000.0
_GUARDED = (torch.float32, torch.float64)


# the matrix-product backends whose float32 precision a program can lower, by device type
_BACKENDS = {"cuda": "cuda", "cpu": "mkldnn"}
_FULL = ("ieee", "none")  # full float32 precision ("none": the default, not lowered)


def reduced(t: Tensor) -> bool:
    """Whether float32 matrix products of ``t``'s device run at reduced precision (TF32,
    bf16) under the program's settings."""
    backend = _BACKENDS.get(t.device.type)
    if t.dtype != torch.float32 or backend is None:
        return False
    return _precision(backend) not in _FULL


def _precision(backend: str) -> str:
    """``torch.backends.<backend>.matmul.fp32_precision``, read without its two Python layers
    (a few µs)."""
    return str(torch._C._get_fp32_precision_getter(backend, "matmul"))


def operands(*ts: Tensor) -> tuple[Tensor, ...]:
    """The Grams' factors ``ts``, in float64 where float32 products would run at reduced
    precision (``reduced``), so that the Grams round at least as well as float32."""
    if not reduced(ts[0]):
        return ts
    return tuple(t.double() for t in ts)


def sq_norms(L: Tensor, R: Tensor) -> Tensor:
    """``‖Σ_t L_t ⊗ R_t‖²`` for each of the batched factors ``L`` (m, a, T) and ``R``
    (m, b, T), positions last as a conv's im2col has them, from their T×T Grams, guarded
    (``guarded_sum``): ``(m,)`` in ``L``'s dtype, the Grams in float64 where float32
    products are lowered (``operands``)."""
    dtype = L.dtype
    L, R = operands(L, R)
    X = torch.bmm(L.transpose(1, 2), L)  # (m, T, T)
    Y = torch.bmm(R.transpose(1, 2), R)  # (m, T, T)
    return guarded_sum(X.mul_(Y), L.shape[1], R.shape[1]).to(dtype)  # (m,)


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


def guarded_sum(Z: Tensor, a: int, b: int) -> Tensor:
    """``max(S, κ Ê)`` for the ghost squared norms ``S = Σ_ts Z_ts`` ``(m,)`` of the
    Grams' product ``Z = X ∘ Y`` ``(m, T, T)`` (widths ``a`` and ``b``), whose diagonal
    sums to ``V``.

    Up to ``_CACHED_T`` positions, both sums come from one product with a ``(T², 2)``
    matrix of weights, ones and ``κ u (√a + √b + T)`` on the diagonal's places, kept per
    size (a GPU step's host pays for each operator more than for its arithmetic); beyond,
    from a sum and the diagonal's sum. ``fmax`` keeps the larger, and the other where one
    is NaN: an example whose Grams overflow to ``+inf`` (``inf · 0`` in the weights'
    product) gets an infinite norm, and no clipped contribution, not a NaN norm that
    would make every example's sum NaN. (Where they overflow to both signs, the norm is
    NaN, as any ghost norm's would be.)"""
    m, T, _ = Z.shape
    c = scale(Z.dtype, a, b, T)
    if c is None:
        return Z.sum((1, 2))  # (m,)
    if T > _CACHED_T:
        V = Z.diagonal(dim1=1, dim2=2).sum(1)  # (m,)
        return torch.fmax(Z.sum((1, 2)), V.mul_(c))  # (m,)
    SV = torch.mm(Z.view(m, T * T), _weights(T, c, Z))  # (m, 2): S, c V
    return torch.fmax(*SV.unbind(1))  # (m,): S against c V (one call for both columns)


# up to this many positions a site's weights are kept (T² · 2 elements: 0.5 MiB in float32)
_CACHED_T = 256


def _weights(T: int, c: float, like: Tensor) -> Tensor:
    """``(T², 2)``: ones, and ``c`` at the diagonal's places of a flattened ``T × T``,
    kept per size, scale, dtype and device, at most 16 (made anew inside a CUDA graph's
    capture, whose operators run only on replay)."""
    if like.is_cuda and torch.cuda.is_current_stream_capturing():
        return _make_weights(T, c, like.dtype, like.device)
    return _cached_weights(T, c, like.dtype, like.device)


def _make_weights(T: int, c: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    W = torch.zeros(T * T, 2, dtype=dtype, device=device)  # (T², 2)
    W[:, 0] = 1
    W[:: T + 1, 1] = c  # the diagonal of (T, T), flattened
    return W


_cached_weights = functools.lru_cache(maxsize=16)(_make_weights)
