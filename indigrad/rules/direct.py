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
    where      where(c, p, x),  where(c, x, p)  g_i = Σ_b (G ⊙ c)_i  (¬c for the second)
    embedding  F.embedding(ids, p)            the nn.Embedding rule on (ids, G)

The last is how ``nn.Embedding`` subclasses with a forward of their own (Hugging Face's
scaled word embeddings, ``embedding(ids) * scale``) use their table: a table looked up
once per call takes the ``nn.Embedding`` rule's norms and weighted sum, never the
``(n, V, d)`` per-example gradients, and a table called several times the Grams of its
uses (:mod:`.tied`). Its ids must have the batch's ``n`` entries in the batch dimension
and in no other.

``Σ_b`` sums the dimensions along which ``p`` was broadcast, other than the batch's. A
parameter used several times sums its uses. The path is taken for a call only when every
use of every one of the module's own trainable parameters is such an op, on an output
with ``n`` entries in the batch dimension where the parameter has one; otherwise the
generic rule re-runs the module per example, as before.

Which dimension of the op's output is the batch: where the parameter is broadcast along
only one dimension of ``n`` entries and that is the capture's batch dimension, that one.
Where it is broadcast along several (a layer scale on ``(n, C, H, W)`` maps with ``H =
n``), or along one elsewhere (a layout transposed inside the module), the op's other
operand is followed back through the graph, through elementwise ops and permutations, to
a tensor whose batch dimension is known: the module's input, or a recorded layer's
output. The candidate that lands on that tensor's batch dimension is the batch. Where the
path leads through anything else (a view, a matmul), the two cannot be told apart and the
module is re-run (the generic rule's errors then say so).

A module of the root's (a torchvision ``VisionTransformer`` owns its class token) would
otherwise re-run the whole model for each example.
"""

from __future__ import annotations

from collections.abc import Container, Iterable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.utils._pytree import tree_leaves

from .._graph import _POINTWISE
from .._precision import _param_dtype, _upcast
from . import tied
from .embedding import embedding_grads, embedding_sq_norms, embedding_weighted_sum

if TYPE_CHECKING:
    from ..capture import _Call


@dataclass(frozen=True, eq=False)
class Use:
    """One op of a module's forward through which a parameter reaches the batch."""

    local: str  # the parameter's name in its module
    edge: GradientEdge  # the op's output, whose gradient autograd returns
    shape: tuple[int, ...]  # the op's output shape, batch included
    coef: float  # the factor of G in the parameter's gradient (±α, or 1)
    other: Tensor | None  # mul: the other factor, where: the mask; None for a scaled G
    batch: int  # the batch dimension of the op's output
    lookup: Lookup | None = None  # an embedding lookup: its ids and options


@dataclass(frozen=True, eq=False)
class Lookup:
    """``F.embedding(ids, p)``: a table ``p`` (V, d) looked up by ``ids`` (batch in the
    use's ``batch``), as ``nn.Embedding`` subclasses with a forward of their own do."""

    ids: Tensor
    padding_idx: int | None
    scale_grad_by_freq: bool

    def table(self, p: Tensor) -> Any:
        """What the ``nn.Embedding`` rule reads of a module, for ``p``."""
        return SimpleNamespace(
            weight=p,
            num_embeddings=p.shape[0],
            padding_idx=self.padding_idx,
            scale_grad_by_freq=self.scale_grad_by_freq,
        )


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


def _aligned(p: Tensor, shape: tuple[int, ...]) -> tuple[int, ...]:
    """``p``'s shape with leading ones, as broadcasting to ``shape`` aligns it (``p`` has
    at most as many dimensions)."""
    return (1,) * (len(shape) - p.dim()) + tuple(p.shape)


def _broadcasts(p: Tensor, shape: tuple[int, ...], n: int, bd: int) -> bool:
    """``p`` broadcasts to ``shape``, whose dimension ``bd`` is the batch of ``n``, without
    an entry of its own in that dimension."""
    if len(shape) <= bd or shape[bd] != n or p.dim() > len(shape):
        return False
    full = _aligned(p, shape)
    return full[bd] == 1 and all(a in (1, b) for a, b in zip(full, shape, strict=True))


def _candidates(p: Tensor, shape: tuple[int, ...], n: int) -> list[int]:
    """The dimensions of ``shape`` that could be the batch: ``n`` entries, along which
    ``p`` is broadcast."""
    if p.dim() > len(shape):
        return []
    pairs = enumerate(zip(_aligned(p, shape), shape, strict=True))
    return [d for d, (a, b) in pairs if a == 1 and b == n]


def plan(
    call: _Call, found: Iterable[tuple[Any, Tensor]], n: int, bd: int, calls: Iterable[_Call]
) -> list[Use] | None:
    """The uses of ``call``'s parameters, from the edges ``(node, parameter)`` into their
    accumulators that the graph walk found inside the call; None where one of them is
    not an op of this module's table (the generic rule then re-runs the module, and
    ``call.rerun_because`` says why). ``calls``: the capture's calls, whose outputs have
    a known batch dimension. Call before the backward, which frees the tensors that a
    ``mul`` saved."""
    local = {id(p): k for k, p in call.params.items()}
    uses: list[Use] = []
    seen: set[tuple[int, int]] = set()
    known: set[tuple[Any, int]] | None = None  # built where a batch must be traced
    adopted = set(call.adopted)  # last: where they alone need a re-run, capture says so
    for node, p in sorted(found, key=lambda use: local[id(use[1])] in adopted):
        key = (id(node), id(p))
        if key in seen:
            continue
        seen.add(key)
        slots = [i for i, (v, _) in enumerate(node.next_functions) if _variable(v) is p]
        shape = tuple(node._input_metadata[0].shape)
        op = type(node).__name__
        if op == "EmbeddingBackward0":
            lookup = _lookup(node, slots, local[id(p)], shape, n, bd)
            if lookup is None:
                return _refuse(
                    call,
                    local[id(p)],
                    f"is looked up by ids whose batch dimension {bd} does not have the "
                    f"batch's {n} entries, or another dimension has as many",
                )
            uses.append(lookup)
            continue
        cands = [bd] if n == 1 else _candidates(p, shape, n)  # n = 1: summed or not alike
        batch: int | None = bd
        if cands != [bd]:
            if known is None:
                known = _batched(call, calls, n, bd)
            batch = _trace(node, slots, cands, bd, known) if cands else None
        use = None if batch is None else _use(node, op, slots, local[id(p)], p, shape, n, batch)
        if use is None and len(cands) > 1:
            return _refuse(
                call,
                local[id(p)],
                f"is broadcast by {op} to {shape}, whose dimensions {cands} have as many "
                f"entries as the batch ({n}), and the graph does not show which of them is "
                "the batch; with another batch size the gradient is read from the graph "
                "and nothing is re-run",
            )
        if use is None:
            return _refuse(
                call,
                local[id(p)],
                f"meets the batch in {op} (output {shape}), which is not an expand, add, "
                f"sub, mul or where that broadcasts it along the batch dimension {bd}, nor an "
                "embedding lookup",
            )
        uses.append(use)
    return uses


def _refuse(call: _Call, local: str, because: str) -> list[Use] | None:
    """Record why ``call`` must be re-run (for the generic rule's messages): its parameter
    ``local`` ``because`` …; returns :func:`plan`'s None."""
    call.rerun_param, call.rerun_because = local, f"its parameter {local!r} {because}"
    return None


def _use(
    node: Any,
    op: str,
    slots: list[int],
    local: str,
    p: Tensor,
    shape: tuple[int, ...],
    n: int,
    batch: int,
) -> Use | None:
    """The use of ``p`` in ``node`` (its inputs ``slots``), with the batch in dimension
    ``batch`` of its output, or None where the table does not cover it."""
    if len(node._input_metadata) != 1 or not _broadcasts(p, shape, n, batch):
        return None
    edge = GradientEdge(node, 0)
    if op == "MulBackward0":
        if slots not in ([0], [1]):
            return None  # p ⊙ p: not a product with the batch
        other = node._saved_other if slots == [0] else node._saved_self
        if not isinstance(other, Tensor):
            return None
        return Use(local, edge, shape, 1.0, other, batch)
    if op == "WhereBackward0":  # a mask: G where p was taken, 0 elsewhere
        cond = node._saved_condition
        if slots not in ([0], [1]) or not isinstance(cond, Tensor):
            return None
        return Use(local, edge, shape, 1.0, cond if slots == [0] else ~cond, batch)
    coefs = [_coef(node, i) for i in slots]
    if not slots or any(c is None for c in coefs):
        return None
    return Use(local, edge, shape, sum(c for c in coefs if c is not None), None, batch)


def _lookup(
    node: Any, slots: list[int], local: str, shape: tuple[int, ...], n: int, bd: int
) -> Use | None:
    """The lookup of the table at ``slots`` of an ``EmbeddingBackward0`` ``node``, or None
    where its ids do not have the batch in ``bd`` alone."""
    ids = node._saved_indices  # (*, n at bd, *)
    if slots != [0] or len(node._input_metadata) != 1 or ids.dim() <= bd:
        return None
    if n > 1 and [d for d, k in enumerate(ids.shape) if k == n] != [bd]:
        return None  # a dimension of the ids other than bd could be the batch
    if ids.shape[bd] != n:
        return None
    pad = node._saved_padding_idx  # -1 (or stored unsigned, 2⁶⁴ - 1): none
    lookup = Lookup(ids, None if pad in (-1, 2**64 - 1) else pad, node._saved_scale_grad_by_freq)
    return Use(local, GradientEdge(node, 0), shape, 1.0, None, bd, lookup)


# Backward nodes (without their number) of ops whose output takes each input of its own
# shape entry for entry: a dimension stays where it is through them.
_UNARY = """Clone ToCopy Neg Abs Exp Log Sqrt Rsqrt Pow Tanh Sigmoid Relu LeakyRelu Gelu Silu
Elu Hardtanh Hardswish Hardsigmoid Mish Softplus NativeDropout"""
_SAME_PLACE = frozenset(
    [k.rstrip("0123456789") for k in _POINTWISE] + [f"{op}Backward" for op in _UNARY.split()]
)
_LIMIT = 64  # nodes visited before giving up


def _dim(d: int, ndim: int) -> int:
    """A dimension saved by a node, possibly negative and stored unsigned, as 0..ndim-1."""
    return (d - 2**64 if d >= 2**63 else d) % ndim


def _permuted(node: Any, kind: str, ndim: int) -> list[int] | None:
    """For a permute or transpose node (``kind``: its class name without the number), the
    input dimension that each of its ``ndim`` output dimensions is; None for another op."""
    if kind == "PermuteBackward":
        return [_dim(d, ndim) for d in node._saved_dims]
    if kind not in ("TransposeBackward", "TBackward"):
        return None
    a, b = (0, 1) if kind == "TBackward" else (node._saved_dim0, node._saved_dim1)
    a, b = _dim(a, ndim), _dim(b, ndim)
    dims = list(range(ndim))
    dims[a], dims[b] = b, a
    return dims


def _batched(call: _Call, calls: Iterable[_Call], n: int, bd: int) -> set[tuple[Any, int]]:
    """The edges ``(node, output_nr)`` of tensors whose batch dimension is ``bd``: the
    recorded calls' outputs and ``call``'s inputs, where they have ``n`` entries there
    (the assumption by which the capture reads them too)."""
    known = set()
    for c in calls:
        if not c.broadcast:
            for e in c.edges:
                shape = e.node._input_metadata[e.output_nr].shape
                if len(shape) > bd and shape[bd] == n:
                    known.add((e.node, e.output_nr))
    for t in tree_leaves((call.args, call.kwargs)):
        if isinstance(t, Tensor) and t.requires_grad and t.dim() > bd and t.shape[bd] == n:
            e = get_gradient_edge(t)
            known.add((e.node, e.output_nr))
    return known


def _trace(
    node: Any, slots: list[int], cands: list[int], bd: int, known: set[tuple[Any, int]]
) -> int | None:
    """Which of the dimensions ``cands`` of ``node``'s output is the batch: followed back
    from the op's other operands, through ops that keep or permute dimensions, to a
    tensor of ``known`` (batch in ``bd``). None where no path shows it."""
    shape = tuple(node._input_metadata[0].shape)
    start = tuple(cands)  # where each candidate is, in the tensor reached
    stack = [
        (v, nr, start)
        for i, (v, nr) in enumerate(node.next_functions)
        if i not in slots and v is not None and _shape(v, nr) == shape
    ]
    seen: set[tuple[Any, int, tuple[int, ...]]] = set()
    while stack and len(seen) < _LIMIT:
        v, nr, at = stack.pop()
        if (v, nr) in known:
            hits = [c for c, d in zip(cands, at, strict=True) if d == bd]
            return hits[0] if len(hits) == 1 else None
        if (v, nr, at) in seen:
            continue
        seen.add((v, nr, at))
        kind = type(v).__name__.rstrip("0123456789")
        here = _shape(v, nr)
        if kind in _SAME_PLACE:
            moved = at
        elif (perm := _permuted(v, kind, len(here))) is not None:
            moved = tuple(perm[d] for d in at)  # output dimension j is input dimension perm[j]
        else:
            continue  # a view, a reduction, a product: the dimensions cannot be followed
        for w, wnr in v.next_functions:
            if w is None:
                continue
            if kind not in _SAME_PLACE or _shape(w, wnr) == here:
                stack.append((w, wnr, moved))
    return None


def _shape(node: Any, nr: int) -> tuple[int, ...]:
    """The shape of output ``nr`` of ``node``'s op."""
    return tuple(node._input_metadata[nr].shape)


def _variable(node: Any) -> Any:
    return getattr(node, "variable", None) if node is not None else None


def grads(call: _Call, n: int, names: Container[str] | None = None) -> dict[str, Tensor]:
    """Per-example gradients ``{local_name: (n, *shape)}`` of ``call``'s parameters (of
    ``names`` only, if given) from the gradients of their uses' outputs
    (``call.inner_grads``, in ``call.direct``'s order); zeros for a parameter whose uses
    got no gradient."""
    assert call.direct is not None
    dtype = _param_dtype(call)
    out: dict[str, Tensor] = {}
    for use, G in zip(call.direct, call.inner_grads, strict=True):
        if G is None or (names is not None and use.local not in names):
            continue
        p = call.params[use.local]
        g = _upcast(G, dtype)  # (*shape), n at use.batch
        if use.lookup is not None:
            ids = use.lookup.ids.movedim(use.batch, 0)  # (n, *)
            table = use.lookup.table(p)
            g = embedding_grads(table, (ids,), g.movedim(use.batch, 0))["weight"]  # (n, V, d)
            g = g.to(p.dtype)
        else:
            g = _reduce(use, g, p, n)  # (n, *p.shape)
        out[use.local] = g if use.local not in out else out[use.local] + g
    for k, p in call.params.items():
        if k not in out and (names is None or k in names):
            out[k] = torch.zeros((n, *p.shape), dtype=p.dtype, device=p.device)
    return out


def _reduce(use: Use, G: Tensor, p: Tensor, n: int) -> Tensor:
    """``(n, *p.shape)``: the per-example gradient of ``p`` from the gradient ``G`` at the
    output of an expand, add, sub, mul or where."""
    if use.other is not None:
        G = G * _upcast(use.other, G.dtype)  # (*shape)
    elif use.coef != 1.0:
        G = G * use.coef  # (*shape)
    G = G.movedim(use.batch, 0)  # (n, *rest)
    full = _aligned(p, use.shape)
    rest = full[: use.batch] + full[use.batch + 1 :]
    summed = [d + 1 for d, (a, b) in enumerate(zip(rest, G.shape[1:], strict=True)) if a < b]
    if summed:
        G = G.sum(summed, keepdim=True)  # (n, *rest of p)
    return G.reshape(n, *p.shape).to(p.dtype)  # (n, *p.shape)


def _lookups(call: _Call) -> dict[str, tuple[Use, Tensor]]:
    """The parameters whose one use with a gradient is an embedding lookup, with that use
    and its output gradient (batch first): their norms and sums need no ``(n, V, d)``."""
    assert call.direct is not None
    counts: dict[str, int] = {}
    found: dict[str, tuple[Use, Tensor]] = {}
    for use, G in zip(call.direct, call.inner_grads, strict=True):
        if G is None:
            continue
        counts[use.local] = counts.get(use.local, 0) + 1
        if use.lookup is not None:
            found[use.local] = (use, _upcast(G, _param_dtype(call)).movedim(use.batch, 0))
    return {k: v for k, v in found.items() if counts[k] == 1}


def lookup_sq_norms(call: _Call) -> dict[str, Tensor]:
    """``{local_name: (n,)}``: the squared norms of the parameters of :func:`_lookups`, by
    the ``nn.Embedding`` rule's own."""
    out = {}
    for k, (use, G) in _lookups(call).items():
        assert use.lookup is not None
        ids = use.lookup.ids.movedim(use.batch, 0)  # (n, *)
        out[k] = embedding_sq_norms(use.lookup.table(call.params[k]), (ids,), G)["weight"]
    return out


def lookup_weighted_sums(call: _Call, coef: Tensor) -> dict[str, Tensor]:
    """``{local_name: Σ_i coef_i g_i}`` of the parameters of :func:`_lookups`."""
    out = {}
    for k, (use, G) in _lookups(call).items():
        assert use.lookup is not None
        p = call.params[k]
        ids = use.lookup.ids.movedim(use.batch, 0)  # (n, *)
        ws = embedding_weighted_sum(use.lookup.table(p), (ids,), G, coef)["weight"]  # (V, d)
        out[k] = ws.to(p.dtype)
    return out


def lookup_factors(call: _Call, local: str) -> Any:
    """The one-hot factors (:mod:`.tied`) of parameter ``local``'s gradient where its one
    use in ``call`` is an embedding lookup, for the norms of a table used by several calls;
    else None."""
    found = _lookups(call).get(local)
    if found is None:
        return None
    use, G = found
    assert use.lookup is not None
    ids = use.lookup.ids.movedim(use.batch, 0)  # (n, *)
    return tied.embedding_factors(use.lookup.table(call.params[local]), (ids,), G, local)
