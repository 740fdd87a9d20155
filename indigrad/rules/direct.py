"""Parameters used directly in a forward, broadcast into the batch: the generic rule's
fast path.

A module without a rule of its own often uses a parameter in its forward through one
elementwise op that broadcasts it to the batch: a ViT's class token
``token.expand(n, 1, d)``, a position embedding ``x + pos``, a layer scale ``gamma * x``.
The gradient ``G`` of that op's output has the batch dimension, so autograd can hand it
over like a layer's output gradient (the op's output edge is asked for beside the
layers'), and the per-example gradient is a reduction of it, with no re-run of the
module:

    expand     p.expand(shape)                g_i = Σ_b G_i
    add, sub   x + α p,  p + α x,  p − α x     g_i = Σ_b G_i       (α G_i for x + α p)
               x − α p                         g_i = −α Σ_b G_i
    mul        x ⊙ p,  p ⊙ x                   g_i = Σ_b (G ⊙ x)_i

``Σ_b`` sums the dimensions along which ``p`` was broadcast, other than the batch's. A
parameter used several times sums its uses. The path is taken for a call only when every
use of every one of the module's own trainable parameters is such an op, on an output
with ``n`` entries in the batch dimension where the parameter has one; otherwise the
generic rule re-runs the module per example, as before. So does a use whose output has
``n`` entries in another dimension along which the parameter is broadcast too: a layout
transposed inside the module (sequence first, with T = n) would make that dimension the
batch, and the two cannot be told apart (the generic rule's errors then say so).

A module of the root's (a torchvision ``VisionTransformer`` owns its class token) would
otherwise re-run the whole model for each example.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from .._precision import _param_dtype, _upcast

if TYPE_CHECKING:
    from ..capture import _Call


@dataclass(frozen=True, eq=False)
class Use:
    """One op of a module's forward through which a parameter reaches the batch."""

    local: str  # the parameter's name in its module
    edge: GradientEdge  # the op's output, whose gradient autograd returns
    shape: tuple[int, ...]  # the op's output shape, batch included
    coef: float  # the factor of G in the parameter's gradient (±α, or 1)
    other: Tensor | None  # mul: the other factor; None for a scaled G


def _coef(node: Any, slot: int) -> float | None:
    """The factor of the output gradient in the gradient of input ``slot`` of ``node``
    (an expand, add or sub), or None for another op."""
    kind = type(node).__name__
    if kind == "ExpandBackward0":
        return 1.0
    if kind in ("AddBackward0", "SubBackward0"):
        alpha = node._saved_alpha
        if isinstance(alpha, complex):
            return None
        if slot == 0:
            return 1.0
        return float(alpha) if kind == "AddBackward0" else -float(alpha)
    return None


def _broadcasts(p: Tensor, shape: tuple[int, ...], n: int, bd: int) -> bool:
    """``p`` broadcasts to ``shape``, whose dimension ``bd`` is the batch of ``n``, without
    an entry of its own in that dimension."""
    if len(shape) <= bd or shape[bd] != n or p.dim() > len(shape):
        return False
    full = (1,) * (len(shape) - p.dim()) + tuple(p.shape)
    return full[bd] == 1 and all(a in (1, b) for a, b in zip(full, shape, strict=True))


def _also_n(p: Tensor, shape: tuple[int, ...], n: int, bd: int) -> list[int]:
    """Dimensions of ``shape`` other than ``bd`` with ``n`` entries along which ``p`` is
    broadcast: each could be the batch as well (a layout transposed inside the module,
    with T = n), so indigrad refuses to guess."""
    if n == 1:
        return []  # summing a dimension of one entry or not is the same
    full = (1,) * (len(shape) - p.dim()) + tuple(p.shape)
    pairs = enumerate(zip(full, shape, strict=True))
    return [d for d, (a, b) in pairs if a == 1 and b == n and d != bd]


def plan(call: _Call, found: Iterable[tuple[Any, Tensor]], n: int, bd: int) -> list[Use] | None:
    """The uses of ``call``'s parameters, from the edges ``(node, parameter)`` into their
    accumulators that the graph walk found inside the call; None where one of them is
    not an op of this module's table (the generic rule then re-runs the module, and
    ``call.rerun_because`` says why). Call before the backward, which frees the tensors
    that a ``mul`` saved."""
    local = {id(p): k for k, p in call.params.items()}
    uses: list[Use] = []
    seen: set[tuple[int, int]] = set()
    for node, p in found:
        key = (id(node), id(p))
        if key in seen:
            continue
        seen.add(key)
        slots = [i for i, (v, _) in enumerate(node.next_functions) if _variable(v) is p]
        shape = tuple(node._input_metadata[0].shape)
        op = type(node).__name__
        use = _use(node, op, slots, local[id(p)], p, shape, n, bd)
        if use is None:
            call.rerun_because = (
                f"its parameter {local[id(p)]!r} meets the batch in {op} (output "
                f"{shape}), which is not an expand, add, sub or mul that broadcasts it "
                f"along the batch dimension {bd}"
            )
            return None
        also = _also_n(p, shape, n, bd)
        if also:
            call.rerun_because = (
                f"its parameter {local[id(p)]!r} is broadcast by {op} to {shape}, whose "
                f"dimensions {also} have as many entries as the batch ({n}), so which of "
                "them is the batch cannot be told; with another batch size the gradient is "
                "read from the graph and nothing is re-run"
            )
            return None
        uses.append(use)
    return uses


def _use(
    node: Any,
    op: str,
    slots: list[int],
    local: str,
    p: Tensor,
    shape: tuple[int, ...],
    n: int,
    bd: int,
) -> Use | None:
    """The use of ``p`` in ``node`` (its inputs ``slots``), or None where the table does
    not cover it."""
    if len(node._input_metadata) != 1 or not _broadcasts(p, shape, n, bd):
        return None
    edge = GradientEdge(node, 0)
    if op == "MulBackward0":
        if slots not in ([0], [1]):
            return None  # p ⊙ p: not a product with the batch
        other = node._saved_other if slots == [0] else node._saved_self
        return Use(local, edge, shape, 1.0, other) if isinstance(other, Tensor) else None
    coefs = [_coef(node, i) for i in slots]
    if not slots or any(c is None for c in coefs):
        return None
    return Use(local, edge, shape, sum(c for c in coefs if c is not None), None)


def _variable(node: Any) -> Any:
    return getattr(node, "variable", None) if node is not None else None


def grads(call: _Call, n: int, bd: int) -> dict[str, Tensor]:
    """Per-example gradients ``{local_name: (n, *shape)}`` of ``call``'s parameters from
    the gradients of their uses' outputs (``call.inner_grads``, in ``call.direct``'s
    order); zeros for a parameter whose uses got no gradient."""
    assert call.direct is not None
    dtype = _param_dtype(call)
    out: dict[str, Tensor] = {}
    for use, G in zip(call.direct, call.inner_grads, strict=True):
        if G is None:
            continue
        p = call.params[use.local]
        g = _upcast(G, dtype)  # (*shape), n at bd
        if use.other is not None:
            g = g * _upcast(use.other, dtype)  # (*shape)
        elif use.coef != 1.0:
            g = g * use.coef  # (*shape)
        g = g.movedim(bd, 0)  # (n, *rest)
        full = (1,) * (len(use.shape) - p.dim()) + tuple(p.shape)
        rest = full[:bd] + full[bd + 1 :]
        summed = [d + 1 for d, (a, b) in enumerate(zip(rest, g.shape[1:], strict=True)) if a < b]
        if summed:
            g = g.sum(summed, keepdim=True)  # (n, *rest of p)
        g = g.reshape(n, *p.shape).to(p.dtype)  # (n, *p.shape)
        out[use.local] = g if use.local not in out else out[use.local] + g
    for k, p in call.params.items():
        if k not in out:
            out[k] = torch.zeros((n, *p.shape), dtype=p.dtype, device=p.device)
    return out
