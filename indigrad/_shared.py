"""Calls without the batch dimension: where their outputs meet the batch.

A layer called on tensors without the batch dimension (a position embedding of
``arange(T)``, T5's relative position bias of a ``(T, T)`` table of buckets, a small MLP on
a coordinate table) produces an output that every example shares. Autograd's gradient at
that output is the sum over the batch; each example's share of it exists only from where
the output meets the batch. So, for each such call (its output ``O``):

1. Before the backward, the graph is followed forward from ``O``, op by op, through ops
   that keep it batch-free (``O``'s *region*: views, permutes, elementwise ops, reductions,
   other batch-free layers, with parameters or constants that add no dimension), to the
   ops where it meets the batch (*meets*): an add, sub, mul, where or expand that broadcasts the
   region's tensor along the batch dimension, the ops of :mod:`.rules.direct`'s table.
2. The backward asks for the meets' output gradients, which have the batch, instead of
   ``O``'s; nothing it asks for lies behind the region, so it does not run the region's
   ops, whose saved tensors stay.
3. Each meet's gradient, reduced per example to the region's operand, is carried back to
   ``O`` by one more backward over the region with ``is_grads_batched``: a batch of ``n``
   output gradients, one per example. Where ``O`` meets the batch at once (``x + pos``),
   the reduced gradient is ``O``'s and that backward is skipped.

The rules then see the call as if it had been made on the batch: its inputs expanded
(stride 0) and ``G`` with the batch in the batch dimension (replacing a dimension of one
entry there, as in ``(1, T, d)``). The forward itself is left exactly as the model wrote
it. A path the region cannot follow (the output reshaped into the batch, multiplied by a
batched matrix, or a dimension of ``n`` entries appearing in it) is refused with an error
naming the op, never guessed.

Example:
    >>> import torch, indigrad
    >>> from torch import nn
    >>> class Model(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.pos, self.head = nn.Embedding(8, 4), nn.Linear(4, 2)
    ...     def forward(self, x):                               # (n, T, 4)
    ...         T = x.shape[1]
    ...         bias = self.pos(torch.arange(T)).T.unsqueeze(0)  # (1, 4, T): no batch
    ...         return self.head(x + bias.transpose(1, 2))      # meets the batch in the add
    >>> model, x = Model(), torch.randn(3, 5, 4)
    >>> with indigrad.capture(model) as cap:
    ...     grads = cap.grads(model(x).square().sum((1, 2)))
    >>> grads["pos.weight"].shape
    torch.Size([3, 8, 4])
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from ._graph import View, _local_name, parameters_only
from .rules import direct as _direct

if TYPE_CHECKING:
    from .capture import _Call

# a tensor in the graph: (the node that made it, its output number there)
_Tensor = tuple[Any, int]

_LIMIT = 10_000  # region nodes followed before giving up


class Unfollowed(RuntimeError):
    """A path from a shared output that cannot be followed: at ``node`` (None: no one op),
    in the region of ``call``'s output."""

    def __init__(self, call: _Call, node: Any, what: str) -> None:
        super().__init__(_message(call, node, what))
        self.call, self.node, self.what = call, node, what


@dataclass(frozen=True, eq=False)
class Plan:
    """Where the shared calls' outputs meet the batch."""

    meets: list[Meet]
    region: dict[_Tensor, _Call]  # the region's tensors, outputs included, and their calls
    # a meet lies behind region ops, or a shared output inside another's region: the
    # meets' gradients go back through the region in one batched backward
    through: bool


@dataclass(frozen=True, eq=False)
class Meet:
    """An op where a shared output's region meets the batch."""

    use: _direct.Use  # the op, its output edge and how the operand's gradient follows
    operand: _Tensor  # the region's tensor it takes
    like: Tensor  # a meta tensor of the operand's shape and dtype


def plan(
    shared: list[_Call],
    consumers: dict[_Tensor, list[tuple[Any, int]]],
    whole: Callable[[], dict[_Tensor, list[tuple[Any, int]]]],
    calls: list[_Call],
    n: int,
    bd: int,
    root: Any,
) -> Plan:
    """The meets of the shared calls' outputs (before the backward, which frees what a
    ``mul`` saved), from ``consumers``, those of the outputs, or where the region goes
    further, of the whole graph (``whole()``, built once by the caller). Raises where a
    path from an output cannot be followed, or reaches the losses (``root``, their node)
    without a meet: an output every example shares cannot make one example's loss alone,
    so its batch lies in another dimension than ``bd``."""
    starts = {(e.node, e.output_nr): call for call in shared for e in call.edges}

    def meets_at_once(use: tuple[Any, int]) -> bool:  # an op whose output has the batch
        return any(len(m.shape) > bd and m.shape[bd] == n for m in use[0]._input_metadata)

    if any(t not in consumers or not all(map(meets_at_once, consumers[t])) for t in starts):
        consumers = whole()  # the region goes beyond the outputs (or moved)
    # the region: tensors reached from the outputs through ops whose outputs do not have
    # the batch's n entries in the batch dimension, each with the call it came from; the
    # ops that make such outputs from it are the candidate meets
    region: dict[_Tensor, _Call] = dict(starts)
    stack = list(starts)
    ops: dict[Any, _Call] = {}  # region ops, in the order found
    meets: dict[Any, _Call] = {}
    while stack:
        t = stack.pop()
        for u, _ in consumers.get(t, ()):
            if u in ops or u in meets:
                continue
            shapes = [tuple(m.shape) for m in u._input_metadata]
            if any(len(s) > bd and s[bd] == n for s in shapes):
                meets[u] = region[t]
                continue
            ops[u] = region[t]
            if len(ops) > _LIMIT:
                raise Unfollowed(region[t], None, "is followed through too many ops")
            for k in range(len(shapes)):
                region[(u, k)] = region[t]
                stack.append((u, k))
    for u, call in ops.items():  # each input of a region op: the region's, parameters, or constant
        inputs = [(v, nr) for v, nr in u.next_functions if v is not None]
        if any(t not in region and not parameters_only(t[0]) for t in inputs):
            raise Unfollowed(call, u, "meets the batch where the batch's dimension is not kept")
        if len(inputs) < len(u.next_functions):  # a constant operand: it adds no dimension
            ins = {tuple(v._input_metadata[nr].shape) for v, nr in inputs if (v, nr) in region}
            if any(tuple(m.shape) not in ins for m in u._input_metadata):
                raise Unfollowed(call, u, "is combined with a tensor that adds dimensions")
    reaching = [c for t, c in starts.items() if t[0] is root]
    if root in ops:
        reaching.append(ops[root])
    if reaching:
        raise Unfollowed(
            reaching[0],
            root,
            f"reaches the losses without meeting the batch in dimension {bd} (the "
            "capture's batch_dim), so its batch lies in another dimension: a layer of a "
            "model captured with batch_dim=1 called on a batch-first tensor (a pooled "
            "head's (n, d)) must have the batch in dimension 1 too (pool with "
            "keepdim=True, e.g. h.mean(0, keepdim=True))",
        )
    # the tensors whose batch is known: built once, where a batch must be traced
    batched = functools.cache(lambda: _direct._batched(shared[0], calls, n, bd))
    found = [_meet(u, region, call, n, bd, batched) for u, call in meets.items()]
    nested = any(t[0] in ops for t in starts)
    return Plan(found, region, nested or any(m.operand not in starts for m in found))


def plan_or_absorb(
    shared: list[_Call],
    consumers: dict[_Tensor, list[tuple[Any, int]]],
    whole: Callable[[], dict[_Tensor, list[tuple[Any, int]]]],
    calls: list[_Call],
    regions: dict[Any, set[Any]],
    n: int,
    bd: int,
    root: Any,
) -> Plan | None:
    """:func:`plan`, but where a path cannot be followed inside the call of a module
    without a rule around the shared calls (Swin V2's attention around its position-bias
    MLP), that call takes their parameters as its own: the generic rule re-runs it for
    each example, and the shared calls leave ``shared`` and ``calls``. None where no
    shared call is left."""
    while shared:
        try:
            return plan(shared, consumers, whole, calls, n, bd, root)
        except Unfollowed as err:
            around = [c for c, nodes in regions.items() if err.node in nodes and c in calls]
            host = max(around, key=lambda c: c.name.count(".") + bool(c.name), default=None)
            if host is None:
                raise
            inside = [c for c in shared if all(e.node in regions[host] for e in c.edges)]
            names = {id(p): _local_name(p, host.module) for c in inside for p in c.params.values()}
            if err.call not in inside or None in names.values():
                raise
            for c in inside:
                for p in c.params.values():
                    # a new dict: the one it replaces is shared by the module's calls
                    host.params = {**host.params, names[id(p)]: p}
                shared.remove(c)
                calls.remove(c)
            host.absorbed = (
                f"{err.call.label} inside it is called without the batch dimension, and its "
                f"output {err.what} ({type(err.node).__name__})"
            )
    return None


def _meet(
    u: Any,
    region: dict[_Tensor, _Call],
    call: _Call,
    n: int,
    bd: int,
    known: Callable[[], set[tuple[Any, int]]],
) -> Meet:
    """The meet at ``u`` of the region's tensor it takes; raises where it is not one of
    the direct-use table's ops with the batch found."""
    op = type(u).__name__
    slots = [i for i, t in enumerate(u.next_functions) if t in region]
    if len(slots) != 1:
        raise Unfollowed(call, u, "meets the batch in more than one operand")
    v, nr = u.next_functions[slots[0]]
    meta = v._input_metadata[nr]
    like = torch.empty(meta.shape, dtype=meta.dtype, device="meta")
    shape = tuple(u._input_metadata[0].shape)
    cands = [bd] if n == 1 else _direct._candidates(like, shape, n)
    batch = bd if cands == [bd] else _direct._trace(u, slots, cands, bd, known()) if cands else None
    use = None if batch is None else _direct._use(u, op, slots, "", like, shape, n, batch)
    if use is None:
        raise Unfollowed(
            call,
            u,
            f"meets the batch in {op} (output {shape}), which is not an add, sub, mul, "
            f"where or expand that broadcasts it along the batch dimension {bd}"
            + (" (which dimension is the batch is ambiguous)" if len(cands) > 1 else ""),
        )
    return Meet(use, (v, nr), like)


def check_edges(plan: Plan, calls: list[_Call]) -> None:
    """Raise where another call asks for a gradient inside the region: the backward would
    run the region's ops, which the second backward needs."""
    for call in calls:
        for e in (*call.edges, *call.inner):
            source = plan.region.get((e.node, e.output_nr))
            if source is not None:
                raise RuntimeError(
                    f"{call.label} reads gradients from the output of {source.label}, called "
                    "without the batch dimension and shared by all examples, before that "
                    "output meets the batch. Call the layer on inputs with the batch "
                    "dimension, or freeze it (module.requires_grad_(False))."
                )


def _shape(t: _Tensor) -> tuple[int, ...]:
    return tuple(t[0]._input_metadata[t[1]].shape)


def _message(call: _Call, u: Any, what: str) -> str:
    at = f" ({type(u).__name__})" if u is not None else ""
    return (
        f"{call.label} was called without the batch dimension, and its output, shared by "
        f"all examples, {what}{at}: indigrad cannot tell each example's share of its "
        "gradient there. Call the layer on inputs with the batch dimension, or freeze it "
        "(module.requires_grad_(False))."
    )


def output_grads(
    shared: list[_Call], plan: Plan, grads: Sequence[Tensor | None], n: int, bd: int
) -> None:
    """Set each shared call's ``grad_outputs``, batch in ``bd`` as if its outputs had been
    made on the batch, from the meets' output gradients ``grads`` (``plan.meets``' order)."""
    per: dict[_Tensor, Tensor] = {}  # each operand's per-example gradient, (n, *shape)
    for meet, G in zip(plan.meets, grads, strict=True):
        if G is not None:
            g = _direct._reduce(meet.use, G, meet.like, n)  # (n, *operand shape)
            per[meet.operand] = g if meet.operand not in per else per[meet.operand] + g
    outputs = [(e.node, e.output_nr) for call in shared for e in call.edges]
    found: dict[_Tensor, Tensor | None] = {t: per.get(t) for t in outputs}
    if plan.through and per:  # back through the region, all examples at once
        pulled = torch.autograd.grad(
            [GradientEdge(*t) for t in per],
            [GradientEdge(*t) for t in outputs],
            grad_outputs=list(per.values()),
            is_grads_batched=True,
            allow_unused=True,
        )
        found = dict(zip(outputs, pulled, strict=True))
    for call in shared:
        call.grad_outputs = tuple(
            _layout(
                found[(e.node, e.output_nr)], call.views.get(k), _shape((e.node, e.output_nr)), bd
            )
            for k, e in enumerate(call.edges)
        )


def one_example(shared: list[_Call], bd: int) -> None:
    """With a batch of one, a shared output's gradient is the example's: each call's
    ``grad_outputs`` given the batch dimension."""
    for call in shared:
        call.grad_outputs = tuple(
            None if g is None else _layout(g.unsqueeze(0), None, tuple(g.shape), bd)
            for g in call.grad_outputs
        )


def _layout(g: Tensor | None, view: View | None, shape: tuple[int, ...], bd: int) -> Tensor | None:
    """``g`` ``(n, *shape)`` (viewed as ``(n, *view)`` where the output is a view of the
    tensor whose gradient was read, ``call.views``) with the batch in ``bd``: in place of a
    dimension of one entry there, else inserted there."""
    if g is None:
        return None
    if view is not None:
        g, shape = view.of(g, batched=True), tuple(view.shape)
    g = g.movedim(0, bd)  # (*shape[:bd], n, *shape[bd:])
    if len(shape) > bd and shape[bd] == 1:
        g = g.squeeze(bd + 1)
    return g
