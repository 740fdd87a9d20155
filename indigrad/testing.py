"""The slow, obviously correct reference, and a checker built on it.

``loop_grads`` runs one forward and one backward per example with plain autograd. It is
what every rule and quantity in indigrad is tested against; use :func:`check` to test a
model or a rule of your own the same way.

Example:
    >>> import torch, torch.nn.functional as F, indigrad
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))
    >>> model = model.double()
    >>> x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 2, (6,))
    >>> def losses(x, y):
    ...     return F.cross_entropy(model(x), y, reduction="none")
    >>> indigrad.testing.check(model, losses, x, y, max_norm=0.5)   # raises on any mismatch
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ._batch import has_batch
from .capture import capture

__all__ = ["check", "clipped_sum", "loop_grads", "norms_of"]

LossFn = Callable[..., Tensor]


def loop_grads(
    model: nn.Module, loss_fn: LossFn, *batch: Any, batch_dim: int = 0
) -> dict[str, Tensor]:
    """Per-example gradients by a Python loop: ``{name: (n, *param.shape)}``.

    Args:
        model: the model; its trainable parameters are differentiated.
        loss_fn: ``loss_fn(*batch) -> losses`` with one row per example (``(n,)`` or
            ``(n, ...)``); it calls the model itself.
        batch: the inputs of ``loss_fn``. Tensors whose ``batch_dim`` has ``n`` entries are
            sliced to one example (keeping the dimension); anything else is passed whole.
        batch_dim: the dimension that indexes examples in ``batch``.

    ``n`` is the size of ``batch_dim`` of the first tensor in ``batch``.
    """
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    n = _batch_size(batch, batch_dim)
    rows: dict[str, list[Tensor]] = {k: [] for k in params}
    for i in range(n):
        example = [t.narrow(batch_dim, i, 1) if has_batch(t, n, batch_dim) else t for t in batch]
        loss = loss_fn(*example).sum()
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (k, p), g in zip(params.items(), grads, strict=True):
            rows[k].append(torch.zeros_like(p) if g is None else g)
    return {
        k: torch.stack(v) if v else p.new_zeros((0, *p.shape))
        for (k, v), p in zip(rows.items(), params.values(), strict=True)
    }


def norms_of(grads: dict[str, Tensor]) -> Tensor:
    """``(n,)``: the per-example norm over all parameters of ``{name: (n, *shape)}``."""
    flat = [g.flatten(1) if g.dim() > 1 else g[:, None] for g in grads.values()]
    return torch.cat(flat, dim=1).norm(dim=1)


def clipped_sum(grads: dict[str, Tensor], max_norm: float) -> dict[str, Tensor]:
    """``{name: Σ_i min(1, max_norm / ‖g_i‖) · g_i}`` from per-example gradients."""
    coef = (max_norm / norms_of(grads)).clamp(max=1.0)  # (n,)
    return {k: torch.tensordot(coef.to(g.dtype), g, dims=1) for k, g in grads.items()}


def check(
    model: nn.Module,
    loss_fn: LossFn,
    *batch: Any,
    max_norm: float | None = None,
    batch_dim: int = 0,
    rtol: float | None = None,
    atol: float | None = None,
) -> None:
    """Assert that indigrad's ``grads``, ``norms`` and ``clip_`` match :func:`loop_grads`.

    Each quantity is computed from its own forward inside its own capture, and once more
    all together from a single ``cap.backward``; then each parameter's squared norms
    (``cap.backward(...).sq_norms()``). ``clip_`` is checked on a clean ``.grad``
    (existing gradients are restored afterwards). ``max_norm`` defaults to the median
    per-example norm (1.0 if that is 0), so that some examples are clipped and some are
    not. Tolerances are
    those of ``torch.testing.assert_close`` unless given; use float64 models for tight
    checks. The model should be deterministic (eval mode, or no dropout).

    Raises:
        AssertionError: naming the quantity and parameter that differ.
    """
    ref = loop_grads(model, loss_fn, *batch, batch_dim=batch_dim)
    ref_norms = norms_of(ref)
    if max_norm is None:
        median = float(ref_norms.median()) if ref_norms.numel() else 0.0
        max_norm = median if median > 0 else 1.0

    def close(actual: Tensor, expected: Tensor, what: str) -> None:
        torch.testing.assert_close(
            actual,
            expected,
            rtol=rtol,
            atol=atol,
            msg=lambda m: f"{what} differs from the reference:\n{m}",
        )

    with capture(model, batch_dim=batch_dim) as cap:
        grads = cap.grads(loss_fn(*batch))
    if list(grads) != list(ref):
        raise AssertionError(f"grads has names {list(grads)}, expected {list(ref)}")
    for k in ref:
        close(grads[k], ref[k], f"grads[{k!r}]")

    with capture(model, batch_dim=batch_dim) as cap:
        close(cap.norms(loss_fn(*batch)), ref_norms, "norms")

    saved = {k: p.grad for k, p in model.named_parameters()}
    try:
        for p in model.parameters():
            p.grad = None
        with capture(model, batch_dim=batch_dim) as cap:
            clip_norms = cap.clip_(loss_fn(*batch), max_norm=max_norm)
        close(clip_norms, ref_norms, "clip_ (returned norms)")
        expected = clipped_sum(ref, max_norm)
        for k, p in model.named_parameters():
            if p.requires_grad:
                assert p.grad is not None, f"clip_ left {k}.grad as None"
                close(p.grad, expected[k], f"clip_ ({k}.grad)")
    finally:
        for k, p in model.named_parameters():
            p.grad = saved[k]

    with capture(model, batch_dim=batch_dim) as cap:
        per_example = cap.backward(loss_fn(*batch))
        together = per_example.norms(), per_example.grads()
    close(together[0], ref_norms, "norms (from cap.backward)")
    for k in ref:
        close(together[1][k], ref[k], f"grads[{k!r}] (from cap.backward)")

    with capture(model, batch_dim=batch_dim) as cap:
        sq_norms = cap.backward(loss_fn(*batch)).sq_norms()
    if list(sq_norms) != list(ref):
        raise AssertionError(f"sq_norms has names {list(sq_norms)}, expected {list(ref)}")
    for k, g in ref.items():
        close(sq_norms[k], g.reshape(len(g), -1).square().sum(1), f"sq_norms()[{k!r}]")


def _batch_size(batch: tuple[Any, ...], batch_dim: int) -> int:
    for t in batch:
        if isinstance(t, Tensor) and t.dim() > batch_dim:
            return t.shape[batch_dim]
    raise ValueError("batch holds no tensor with a batch dimension")
