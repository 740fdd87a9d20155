"""Check that every path from the losses into a trainable parameter passes through a
recorded module call of a module that owns the parameter.

A parameter can receive gradient outside the calls that indigrad records: a layer's
weight used again with ``F.linear`` in a parent's ``forward``, a module invoked through
``module.forward(x)`` (which skips hooks). Its per-example gradient would then miss that
part, silently. The check walks the autograd graph in two passes:

1. For each recorded call, walk back from its output node until the nodes of its inputs.
   Every edge met from a node inside into the accumulator of a parameter the module owns
   is *accounted for*.
2. Walk the whole graph from the losses. Any edge into the accumulator of a trainable
   parameter that was not accounted for is an error, unless the innermost recorded call
   without a rule whose walk met it belongs to a module around the parameter's (Swin's
   attention applying its ``qkv`` child's weight with ``F.linear``): that call then takes
   the parameter as one of its own, for the generic rule, where it holds no use of the
   parameter's that another call accounts for (which would be counted twice).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
import torch.utils.checkpoint
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.utils._pytree import tree_leaves

# typed in some torch releases and not in others: looked up by name
_ACCUMULATE = getattr(torch._C._functions, "AccumulateGrad")  # noqa: B009
# reentrant activation checkpointing's node: the region's parameters are not behind it
_REENTRANT = torch.utils.checkpoint.CheckpointFunction._backward_cls


def _check_accounted(
    root: Any,
    calls: list[Any],
    trainable: dict[int, str],
    consumers: dict[tuple[Any, int], list[tuple[Any, int]]] | None = None,
    regions: dict[Any, set[Any]] | None = None,
    batch: tuple[int, int] | None = None,
) -> tuple[list[Any], dict[Any, list[tuple[Any, Any]]]]:
    """Raise if the losses reach no recorded call, or reach a trainable parameter outside
    the calls of its module. Returns the calls whose outputs the losses depend on, and
    for each call without a rule (the generic rule's) the edges ``(node, parameter)``
    from inside the call into its parameters' accumulators: the parameters' uses. With
    ``consumers``, whose keys are tensors ``(node, output_nr)``, fills in their consumers
    ``(node, input slot)`` in the graph. With ``regions``, fills it with the nodes inside
    each call without a rule. With ``batch``, ``(n, batch_dim)``, raises where the
    forward reorders the batch (:func:`_reorders`)."""
    accounted: set[tuple[Any, int]] = set()
    uses: dict[Any, list[tuple[Any, Any]]] = {}
    regions = {} if regions is None else regions  # the nodes inside each call without a rule
    owners: dict[Any, list[Any]] = {}  # each call's nodes that use its parameters
    for call in calls:
        owned = [id(p) for p in call.params.values()]  # a few: searched faster than hashed
        found = uses.setdefault(call, []) if call.rule is None else None
        stop = call.boundary  # a few nodes: a list is searched faster than a set is built
        edges = call.edges
        stack = [edges[0].node] if len(edges) == 1 else [e.node for e in edges]
        seen: set[Any] = set()
        if found is not None:
            regions[call] = seen
        while stack:
            u = stack.pop()
            if u in seen or u in stop:
                continue
            seen.add(u)
            for v, _ in u.next_functions:
                if v is None:
                    continue
                if type(v) is _ACCUMULATE:
                    p = v.variable
                    if id(p) in owned:
                        accounted.add((u, id(p)))
                        owners.setdefault(call, []).append(u)
                        if found is not None:
                            found.append((u, p))
                else:
                    stack.append(v)

    outputs = {e.node: call for call in calls for e in call.edges}
    if consumers is None:
        consumers = {}
    watch = {node for node, _ in consumers}
    for t in list(consumers):  # every output number of the nodes watched
        for nr in range(len(t[0]._input_metadata)):
            consumers.setdefault((t[0], nr), [])
    unaccounted: list[tuple[Any, Any]] = []  # edges (node, parameter)
    batch_norms: list[Any] = []  # batch norms in training mode
    stack = [root]
    seen = {root}
    while stack:
        u = stack.pop()
        for i, (v, slot) in enumerate(u.next_functions):
            if v is None:
                continue
            if watch and v in watch:
                consumers[(v, slot)].append((u, i))
            call = outputs.get(v)
            if call is not None:
                _check_consumer(u, v, slot, call)
            kind = type(v)
            if kind is _ACCUMULATE:
                p = v.variable
                if id(p) in trainable and (u, id(p)) not in accounted:
                    unaccounted.append((u, p))
            elif v not in seen:
                if kind is _REENTRANT:
                    raise RuntimeError(
                        "the forward runs a region under reentrant activation checkpointing "
                        "(torch.utils.checkpoint with use_reentrant=True), which hides the "
                        "region's layers from the autograd graph: their per-example "
                        "gradients cannot be computed. Use use_reentrant=False (for Hugging "
                        "Face models: gradient_checkpointing_enable(gradient_checkpointing_"
                        'kwargs={"use_reentrant": False})).'
                    )
                name = kind.__name__
                if name in _BATCH_NORMS and _mixes(v):
                    batch_norms.append(v)
                elif name == "IndexBackward0" and batch is not None and _reorders(v, *batch):
                    raise RuntimeError(
                        "the forward indexes the batch dimension with a tensor of as many "
                        "entries as examples (`x[order]`, to sort a batch by length and back): "
                        "the rows of what it makes are not the examples in their order, so "
                        "indigrad would read one example's gradient as another's. Keep the "
                        "batch in its order (pack_padded_sequence(..., enforce_sorted=False) "
                        "sorts inside and is supported)."
                    )
                seen.add(v)
                stack.append(v)

    for call in calls:
        _rebased(call, seen, owners.get(call, ()))
    if batch_norms:
        _refuse_batch_statistics(batch_norms, outputs)
    reached = [call for call in calls if _reaches(call.edges, seen)]
    if not reached:
        raise RuntimeError(
            "the losses do not depend on any layer recorded in this capture: was the "
            "forward run inside the `with indigrad.capture(model)` block?"
        )
    for node, p in _adopt(unaccounted, accounted, regions, uses):
        raise RuntimeError(
            f"parameter {trainable[id(p)]!r} receives gradient through {type(node).__name__}, "
            "outside any recorded call of the module that owns it or of a module "
            "around it without a rule, so its per-example gradient would be wrong. Use "
            "the parameter only inside its module's forward, call modules as module(x) "
            "(not module.forward(x)), or freeze it with requires_grad_(False). For a "
            "weight shared by two layers (an LM head tied to the embedding), make both "
            "modules and share the parameter: head.weight = embedding.weight."
        )
    return reached, uses


def _reaches(edges: list[GradientEdge], seen: set[Any]) -> bool:
    """Whether the walk from the losses met one of these edges' nodes."""
    if len(edges) == 1:  # the common case, without a generator
        return edges[0].node in seen
    return any(e.node in seen for e in edges)


class View(NamedTuple):
    """How an output views the whole tensor it was made from: ``as_strided`` of it, or a
    reshape (``stride`` None)."""

    shape: torch.Size
    stride: tuple[int, ...] | None
    offset: int

    def of(self, g: Tensor, batched: bool = False) -> Tensor:
        """The view's part of ``g``, the gradient at the tensor viewed (with a leading batch
        dimension if ``batched``)."""
        if self.stride is None:
            return g.reshape(g.shape[0], *self.shape) if batched else g.reshape(self.shape)
        g = g.contiguous()
        offset = g.storage_offset() + self.offset  # g may start inside a larger storage
        if not batched:
            return g.as_strided(self.shape, self.stride, offset)
        n = g.shape[0]
        step = g[0].numel()
        return g.as_strided((n, *self.shape), (step, *self.stride), offset)


def check_exits(
    call: Any, region: set[Any], graph: dict[tuple[Any, int], list[tuple[Any, int]]]
) -> None:
    """Raise where a tensor made inside a call without a rule (its ``region``: the nodes
    from its outputs back to its inputs) is read outside the call other than as one of its
    outputs (an attribute its forward set, read by the parent): the generic rule re-runs
    the call with its outputs' gradients alone, and would lose the gradient through it.
    ``graph``: the whole graph read forward (:func:`consumers_of`)."""
    outputs = {e.node for e in call.edges}
    outputs.update(b[0] for b in call.bases or () if b is not None)  # views' whole tensors
    for node in region:
        if node in outputs:
            continue
        for nr in range(len(node._input_metadata)):
            for reader, _ in graph.get((node, nr), ()):
                if reader not in region:
                    raise RuntimeError(
                        f"{call.label} has no rule of its own, and a tensor its forward "
                        f"makes ({type(node).__name__}) is read outside the call other than "
                        f"as one of its outputs ({type(reader).__name__}): a tensor kept in "
                        "an attribute in its forward and read by another module? The "
                        "generic rule re-runs the call with its outputs' gradients alone "
                        "and would lose the gradient through it. Return that tensor from "
                        "the forward, or register a rule for the module with "
                        "indigrad.register_rule."
                    )


def consumers_of(root: Any) -> dict[tuple[Any, int], list[tuple[Any, int]]]:
    """Every tensor's ``(node, output_nr)`` consumers ``(node, input slot)`` in the graph
    from ``root``: the graph read forward."""
    found: dict[tuple[Any, int], list[tuple[Any, int]]] = {}
    stack, seen = [root], {root}
    while stack:
        u = stack.pop()
        for i, (v, nr) in enumerate(u.next_functions):
            if v is None:
                continue
            found.setdefault((v, nr), []).append((u, i))
            if v not in seen and type(v) is not _ACCUMULATE:
                seen.add(v)
                stack.append(v)
    return found


_FOLLOW_LIMIT = 64  # ops followed from a questioned output
_SIDE_LIMIT = 16  # nodes of a parameter-only operand (a transposed weight) followed
# the nodes of ops that take rows of a tensor by indices, which autograd does not show
_LOOKUPS = ("Embedding", "Index", "Gather", "Take")
# losses elementwise with reduction="none"
_LOSSES = frozenset(
    {
        "BinaryCrossEntropyWithLogitsBackward",
        "BinaryCrossEntropyBackward",
        "MseLossBackward",
        "SmoothL1LossBackward",
        "HuberLossBackward",
        "L1LossBackward",
    }
)


def confirm_batch(
    call: Any,
    consumers: dict[tuple[Any, int], list[tuple[Any, int]]],
    batched: dict[Any, Any],
    losses: Any,
    n: int,
    bd: int,
    kind: str = "ids",
    trusted: set[Any] | frozenset[Any] = frozenset(),
) -> None:
    """Raise unless the batch dimension ``bd`` of ``call``'s output is followed forward,
    through ops that keep or move dimensions (elementwise ops, permutes, transposes,
    unsqueezes, views that keep the dimensions up to it), to the batch dimension of the
    losses (node ``losses``) or of an input of a batched call (``batched``: their input
    nodes, and the calls) whose only dimension of ``n`` entries it is, and on no path
    elsewhere. Where that input has another dimension of ``n`` entries, the call proves
    nothing: the path goes on from its outputs, the dimension taken to stay in place (for a
    layer with its own layout, an RNN or attention, at that layer's batch positions).
    For calls on integer tensors that could hold ``n`` entries by chance (``kind`` "ids":
    ids made inside the model: shifted decoder ids, a table of positions with as many rows
    as the batch has examples, transposed ids).

    A batched call fed by nothing but the path (and parameters) is judged batched by the
    same size alone: the path ends confirmed there, as before, but is followed on from its
    outputs, and refused where the dimension is then found to end elsewhere (a trainable
    table of latents with as many rows as the batch has examples, normalised, projected,
    and averaged away after attending over each example's tokens).

    A path also ends confirmed where the dimension, in place ``bd``, meets in an
    elementwise op an operand of the same shape that is the output of a batched call whose
    batch is not in question (``trusted``: their output nodes): BERT's default token type
    ids, a buffer expanded to the batch, added to the word embeddings of the model's ids.

    For other calls, only a dimension found to end elsewhere is refused: a path through an
    op that is not followed (pooling, say) proves nothing either way. ``kind`` "floats":
    calls on floating tensors made inside the model (the model's input rescaled, a frozen
    backbone's features, or a coordinate table with as many rows as the batch has
    examples); "inputs": calls on the model's own inputs, where the model ran more than
    once before the backward, had more than one tensor argument of the batch's size, or
    its calls read more than one of its inputs or parts of one (a support set, a table
    handed in beside the batch or sliced from the same tensor)."""
    # the paths to follow: a tensor, where the dimension is in it, and whether it is made
    # from the call's output alone (by ops whose other operands are parameters or
    # constants); ``after``: paths on from a batched call fed by the call's output alone,
    # which already ended confirmed there, followed with a budget of their own
    stack = [((e.node, e.output_nr), bd, True) for e in call.edges]
    after: list[tuple[tuple[Any, int], int, bool]] = []
    budget = {False: _FOLLOW_LIMIT, True: _FOLLOW_LIMIT}
    seen: set[tuple[tuple[Any, int], int, bool, bool]] = set()  # each path taken once
    confirmed = False
    elsewhere = False  # the dimension was found to end elsewhere than the batch's
    stuck = False  # a path before any confirmation could not be followed
    while stack or after:
        settled = not stack
        on = after if settled else stack
        path = on.pop()
        if (*path, settled) in seen:
            continue
        seen.add((*path, settled))
        budget[settled] -= 1
        if budget[settled] < 0:
            stuck = not settled  # a confirmed path stays so
            break
        (v, nr), b, alone = path
        if v is losses:
            if b != 0:
                elsewhere = True  # the dimension taken for the batch ends elsewhere
                break
            confirmed = True
            continue
        here = tuple(v._input_metadata[nr].shape)
        if v in batched:
            made = batched[v]
            at, outs = _batch_dims(made, v, bd)  # where the layer has the batch
            if at is None or (None in outs and sum(size == n for size in here) > 1):
                if not settled:  # a layout indigrad does not know: nothing proved
                    stuck = True
                    break
                continue
            if b != at:
                elsewhere = True
                break
            pairs = zip(made.edges, outs, strict=True)
            onward = [((e.node, e.output_nr), d) for e, d in pairs if d is not None]
            if sum(size == n for size in here) > 1:  # the call proves nothing: go on
                on.extend((t, d, alone) for t, d in onward)
                continue
            confirmed = True
            if alone and all(w is v or parameters_only(w, lookups=False) for w in made.boundary):
                after.extend((t, d, True) for t, d in onward)
            continue
        uses = consumers.get((v, nr), [])
        moves = [_moved(u, b, here, slot) for u, slot in uses]
        if any(m is not None and m[1] != n for m in moves):
            elsewhere = True
            break
        if any(m is None for m in moves) and not settled:
            stuck = True  # not followed: nothing proved
            break
        for (u, slot), m in zip(uses, moves, strict=True):
            if m is None:
                continue  # not followed, on a path already confirmed
            if m[0] == bd and _meets_trusted(u, slot, trusted):
                confirmed = True
                continue
            keeps = alone and all(
                i == slot or w is None or parameters_only(w, lookups=False)
                for i, (w, _) in enumerate(u.next_functions)
            )
            on.append(((u, 0), m[0], keeps))
    if confirmed and not stuck and not elsewhere:
        return
    if kind == "ids":
        raise RuntimeError(
            f"{call.label} is called on integer inputs made inside the model whose "
            f"dimension {bd} has as many entries as the batch ({n}), and indigrad cannot "
            "follow that dimension to the batch's (a table of positions with as many rows "
            "as the batch has examples would look the same): use a batch size different "
            "from the table's size, or hand the layer the model's own input."
        )
    if elsewhere and kind == "inputs":
        raise RuntimeError(
            f"{call.label} is called on an input of the model whose dimension {bd} has as "
            f"many entries as the batch ({n}), but the model ran more than once before the "
            "backward, or had more than one input of that size, or its layers read more than "
            "one of its inputs or parts of one, and this dimension does not end in the losses' "
            "batch dimension, or is summed or multiplied away on its way: a support set or a "
            "table handed to the model beside the batch, whose rows are no examples of it. "
            "Its per-example gradients would be wrong: run the model once per backward, on "
            "the batch, with such a table kept inside it at a size other than the batch's "
            "(its share is then read where it meets the batch), or freeze the layers that "
            "read it."
        )
    if elsewhere:
        raise RuntimeError(
            f"{call.label} is called on a floating-point tensor made inside the model whose "
            f"dimension {bd} has as many entries as the batch ({n}), but that dimension "
            "does not end in the batch's, or is summed or multiplied away on its way: a "
            "table shared by all examples (coordinates, prototypes, a mask) with as many "
            "rows as the batch has examples, or examples mixed with each other. Its "
            "per-example gradients would be wrong: use a batch size different from the "
            "table's size, or freeze the layer."
        )


def _batch_dims(call: Any, v: Any, bd: int) -> tuple[int | None, list[int | None]]:
    """Where the layer of ``call`` has the batch in its input made by node ``v``, and in
    each of its outputs (``call.edges``): ``bd`` for a layer on the capture's layout; for
    one with its own (``raw_layout``), its convention: an RNN's input and output in 0 or 1
    by ``batch_first``, its states in 1; attention's inputs and output likewise, its
    weights in 0. None where it is not known (a packed sequence, another layer)."""
    rule = call.rule
    if rule is None or not rule.raw_layout:
        return bd, [bd] * len(call.edges)
    module = call.module
    if not isinstance(module, nn.RNNBase | nn.MultiheadAttention):
        return None, [None] * len(call.edges)
    first = 0 if module.batch_first else 1  # the input's and the output's
    leaves = tree_leaves((call.args, call.kwargs))
    if not leaves or not isinstance(leaves[0], Tensor) or leaves[0].dim() != 3:
        return None, [None] * len(call.edges)  # packed, or one unbatched sequence
    rnn = isinstance(module, nn.RNNBase)
    at = None
    for k, t in enumerate(leaves):
        if isinstance(t, Tensor) and t.requires_grad and get_gradient_edge(t).node is v:
            at = first if k == 0 or (not rnn and k < 3) else 1 if rnn else None
            break
    states = 1 if rnn else 0  # an RNN's last states; attention's weights
    return at, [first if k == 0 else states for k in call.edge_index]


def _meets_trusted(u: Any, slot: int, trusted: set[Any] | frozenset[Any]) -> bool:
    """Whether elementwise op ``u`` takes, besides its input ``slot``, an operand of its
    output's shape that is the output of a call in ``trusted``."""
    from .rules.direct import _SAME_PLACE

    if not trusted or type(u).__name__.rstrip("0123456789") not in _SAME_PLACE:
        return False
    out = u._input_metadata[0].shape
    return any(
        i != slot and w in trusted and w._input_metadata[nr].shape == out
        for i, (w, nr) in enumerate(u.next_functions)
        if w is not None
    )


# what _moved gives for an op that mixes the entries along the dimension (a sum or a
# softmax over it, a product contracting it): no batch dimension can go there
MIXED = (-1, -1)


def _moved(u: Any, b: int, here: tuple[int, ...], slot: int = 0) -> tuple[int, int] | None:
    """Where dimension ``b`` of op ``u``'s input ``slot`` (of shape ``here``) is in its
    output, and that dimension's size; :data:`MIXED` where the op mixes the entries along
    it; None where the op's dimensions are not followed."""
    from .rules.direct import _SAME_PLACE, _dim, _permuted

    out = tuple(u._input_metadata[0].shape)
    kind = type(u).__name__.rstrip("0123456789")
    if kind in ("MmBackward", "BmmBackward"):  # (…, a, k) @ (…, k, c) -> (…, a, c)
        contracted = len(here) - 1 if slot == 0 else len(here) - 2
        if b == contracted:
            return MIXED
        moved = b
    elif kind in _SAME_PLACE:
        moved = b + len(out) - len(here)  # broadcasting aligns from the right
    elif (perm := _permuted(u, kind, len(out))) is not None:
        moved = perm.index(b)  # the output dimension that is input dimension b
    elif kind in _RESHAPES:
        found = _reshaped(here, out, b)
        if not isinstance(found, int):
            return found  # split, or merged
        moved = found
    elif kind in _REDUCTIONS:
        saved = getattr(u, "_saved_dim", None)  # none, or an empty list: all of it
        if isinstance(saved, int):
            saved = [saved]
        dims = {_dim(d, len(here)) for d in saved or ()}
        if not dims or b in dims:
            return MIXED
        moved = b if u._saved_keepdim else b - sum(d < b for d in dims)
    elif kind.startswith("ScaledDotProduct"):
        # q (…, l, e), k (…, s, e), v (…, s, f), a bias (…, l, s) -> (…, l, f)
        last = len(here) - 1
        if not (b < last - 1 or (b == last - 1 and slot in (0, 3)) or (b == last and slot == 2)):
            return MIXED  # the keys' positions, or the features contracted
        moved = b  # the batch's dimensions, the queries' positions, the values' features
    elif kind == "CdistBackward":  # (…, p, m), (…, r, m) -> (…, p, r)
        if b == len(here) - 1:
            return MIXED  # the coordinates, summed
        moved = len(out) - 1 if slot == 1 and b == len(here) - 2 else b
    elif kind in ("SoftmaxBackward", "LogSoftmaxBackward"):
        if _dim(u._saved_dim, len(here)) == b:
            return MIXED
        moved = b
    elif kind in ("NllLossBackward", "NllLoss2DBackward"):  # (n, C, *) -> (n, *) per example
        if u._saved_reduction != 0 or b == 1:
            return MIXED  # reduced over the batch, or the classes
        moved = b - (b > 1)
    elif kind in _LOSSES:
        moved = b  # elementwise without a reduction; a reduced output has no dimension b
    elif kind in ("CatBackward", "SliceBackward", "SelectBackward"):
        d = _dim(u._saved_dim, len(here))
        if d == b:
            return None
        moved = b - (kind == "SelectBackward" and d < b)
    else:
        return None
    return (moved, out[moved]) if 0 <= moved < len(out) else None


# reductions over the dimensions ``_saved_dim`` (all where it is missing)
_REDUCTIONS = frozenset(
    f"{op}Backward"
    for op in (
        *("Sum", "Mean", "Prod", "Amax", "Amin", "Max", "Min", "Median", "NanMedian"),
        *("Logsumexp", "LinalgVectorNorm", "Norm", "Std", "Var"),
    )
)
# ops that only reshape: a dimension kept whole is followed by the sizes around it
_RESHAPES = frozenset(
    {
        "ViewBackward",
        "UnsafeViewBackward",
        "ReshapeAliasBackward",
        "UnsqueezeBackward",
        "SqueezeBackward",
        "FlattenBackward",
        "UnflattenBackward",
    }
)


def parameters_only(v: Any, lookups: bool = True) -> bool:
    """Whether the operand made by node ``v`` depends on parameters only (a weight, a
    transposed weight): batch-free, whatever its shape. Not ``lookups``: rows of a
    parameter looked up by indices (an embedding of the batch's ids, class centres by the
    labels) do not count: the indices may be the batch's."""
    stack, seen = [v], 0
    while stack:
        u = stack.pop()
        seen += 1
        if seen > _SIDE_LIMIT:
            return False
        if not lookups and type(u).__name__.startswith(_LOOKUPS):
            return False
        if type(u) is _ACCUMULATE:
            if not isinstance(u.variable, nn.Parameter):
                return False
            continue
        for w, _ in u.next_functions:
            if w is None:
                return False  # a constant operand: it could carry the batch
            stack.append(w)
    return True


def _reshaped(here: tuple[int, ...], out: tuple[int, ...], b: int) -> int | tuple[int, int] | None:
    """The dimension of ``out`` that dimension ``b`` of ``here`` is after a reshape, where
    it is kept whole (the entries before it, and its own, are as many as in ``out``'s);
    :data:`MIXED` where it is split (its entries regrouped: a support set's ``(way ·
    shot)`` rows viewed as ``(way, shot)``); None where it is merged with others."""
    before = math.prod(here[:b])
    count = 1
    for j, size in enumerate(out):
        if count == before and (size != 1 or here[b] == 1):
            if size == here[b]:
                return j
            return MIXED if size < here[b] else None
        if count > before:
            return None
        count *= size
    return None


def _rebased(call: Any, seen: set[Any], owners: Iterable[Any]) -> None:
    """Where an output of ``call`` that is a view of a whole tensor (a Linear's on 3-d
    inputs: its ``addmm`` viewed back) was modified in place after the call (a
    ``ReLU(inplace=True)``), autograd has rebuilt the view's history: the node recorded
    for it is no longer in the graph (``seen``), while the base's still is, behind the
    in-place op. The gradient is then read at the base (the same elements, before the
    in-place op) and viewed back (``call.views``). Raise where the call's parameters are
    reached (``owners``: its nodes that use them) but none of its outputs is: its
    gradients would be missed, silently."""
    if call.bases is not None:
        for k, (e, base) in enumerate(zip(call.edges, call.bases, strict=True)):
            if base is None or e.node in seen or base[0] not in seen:
                continue
            node, nr, shape, stride, offset = base
            if any(node is f.node and nr == f.output_nr for f in call.edges):
                continue  # the base is an output too: this view is just unused
            others = [f.node for j, f in enumerate(call.edges) if j != k and f.node in seen]
            if others and _first_reached(others, {node}) is not None:
                # an unused view of a tensor the call computed another output from
                # (attention's weights, the softmax its output is computed from): the
                # gradient reaching the base is that other output's
                continue
            call.edges[k] = GradientEdge(node, nr)
            call.views = {**call.views, k: View(shape, stride, offset)}
    if not _reaches(call.edges, seen) and any(u in seen for u in owners):
        raise RuntimeError(
            f"the losses reach the parameters of {call.label}, but not through the outputs "
            "recorded for its call: an output was changed in place after the call in a way "
            "that rebuilt its autograd history, or the module's result reaches the losses "
            "other than through what it returned. Its per-example gradients would be "
            "missed; use an out-of-place op after the layer."
        )


# the backward nodes of batch normalisation, whose training mode saves ``training``
_BATCH_NORMS = {
    "NativeBatchNormBackward0",
    "CudnnBatchNormBackward0",
    "MiopenBatchNormBackward0",
}


def _reorders(node: Any, n: int, bd: int) -> bool:
    """Whether an indexing node took the rows of a batch, ``n`` entries in dimension
    ``bd``, by one integer index of ``n`` entries along that dimension alone (``x[order]``,
    ``x[:, order]``) other than ``arange(n)``: a permutation, or rows repeated and others
    dropped. (An index along the batch with another one, ``logits[arange(n), last]``, reads
    one entry per example and passes; a boolean mask keeps the rows' order; a parameter's
    rows are a table's.) Only such an index is compared with ``arange(n)``, which on a GPU
    waits for the device."""
    indices = node._saved_indices
    if len(indices) <= bd or node._saved_self_sym_sizes[bd] != n:
        return False
    if type(node.next_functions[0][0]) is _ACCUMULATE:
        return False  # a parameter's rows, looked up (a table of classes by the labels)
    index = indices[bd]
    if not (
        index is not None
        and index.dim() == 1
        and index.shape[0] == n
        and index.dtype != torch.bool
        and all(i is None for k, i in enumerate(indices) if k != bd)
    ):
        return False
    return not torch.equal(index, torch.arange(n, dtype=index.dtype, device=index.device))


def _mixes(node: Any) -> bool:
    """Whether a batch norm's node took statistics over several rows of its input's first
    dimension: training mode, on more than one (``F.instance_norm`` runs it on the batch
    as one row of ``n·C`` channels, which mixes nothing)."""
    return bool(getattr(node, "_saved_training", False)) and node._input_metadata[0].shape[0] > 1


def _refuse_batch_statistics(batch_norms: list[Any], outputs: dict[Any, Any]) -> None:
    """Raise where a batch norm in training mode lies between the losses and a recorded
    call (the capture refuses those of its own model as they run; this finds the others,
    a captured submodule's in the rest of the model): its batch statistics mix the
    examples, so the gradient at the call's output is no example's own. One below every
    recorded call (a frozen backbone in training mode under a captured head) is fine.
    One walk below all of them, not one per batch norm (a backbone has dozens)."""
    u = _first_reached(batch_norms, outputs)
    if u is not None:
        raise RuntimeError(
            f"{outputs[u].label} feeds a batch norm in training mode on its way to the "
            "losses: batch statistics mix the examples of a batch, so no per-example "
            "gradient exists. Put the batch norms in eval mode, or replace them with "
            "GroupNorm / LayerNorm."
        )


def _first_reached(starts: list[Any], targets: Any) -> Any:
    """A node of ``targets`` that the autograd graph below the nodes ``starts`` holds
    (those nodes included), or None."""
    stack, seen = list(starts), set(starts)
    while stack:
        u = stack.pop()
        if u in targets:
            return u
        for v, _ in u.next_functions:
            if v is not None and v not in seen:
                seen.add(v)
                stack.append(v)
    return None


def _adopt(
    unaccounted: list[tuple[Any, Any]],
    accounted: set[tuple[Any, int]],
    regions: dict[Any, set[Any]],
    uses: dict[Any, list[tuple[Any, Any]]],
) -> list[tuple[Any, Any]]:
    """Give each parameter used outside its module's calls, but inside the call of a module
    around it that has no rule (Swin's attention applies its ``qkv`` child's weight with
    ``F.linear``), to the innermost such call: the generic rule then takes its gradient
    with the call's own parameters. Not where that call also holds a use of the parameter
    by its own module's calls, whose gradient would then be counted twice. Returns the
    edges left unaccounted."""
    if not unaccounted:
        return []
    by_param: dict[int, list[tuple[Any, Any]]] = {}
    for node, p in unaccounted:
        by_param.setdefault(id(p), []).append((node, p))
    left = []
    for edges in by_param.values():
        p = edges[0][1]
        around = {  # the calls holding every use, of modules around p: p's name in each
            call: local
            for call, region in regions.items()
            if all(node in region for node, _ in edges)
            and (local := _local_name(p, call.module)) is not None
        }
        call = max(around, key=lambda c: c.name.count(".") + bool(c.name), default=None)
        if call is None or any(u in regions[call] for u, q in accounted if q == id(p)):
            left.extend(edges)
            continue
        local = around[call]
        call.params = {**call.params, local: p}  # the dict is shared by the module's calls
        call.adopted = (*call.adopted, local)
        uses[call].extend(edges)
        accounted.update((node, id(p)) for node, _ in edges)
    return left


def _local_name(p: Any, module: nn.Module) -> str | None:
    """``p``'s name in ``module``, or None where it is not one of its parameters."""
    return next((k for k, q in module.named_parameters() if q is p), None)


# Backward nodes of ops that broadcast their operands elementwise.
_POINTWISE = (
    "AddBackward",
    "SubBackward",
    "RsubBackward",
    "MulBackward",
    "DivBackward",
    "WhereBackward",
    "MaximumBackward",
    "MinimumBackward",
    "LerpBackward",
    "AddcmulBackward",
    "AddcdivBackward",
    "ExpandBackward",
)


def _check_consumer(u: Any, v: Any, slot: int, call: Any) -> None:
    """``u`` consumes output ``slot`` of node ``v``, a recorded call's output."""
    if call.broadcast or not type(u).__name__.startswith(_POINTWISE):
        return  # a shared output's consumers are followed by the capture (_shared.py)
    used = tuple(u._input_metadata[0].shape)  # the shape the consumer produced
    mine = tuple(v._input_metadata[slot].shape)  # the recorded output's shape
    if len(used) > len(mine) and used[len(used) - len(mine) :] == mine:
        raise RuntimeError(
            f"the output {mine} of {call.label} is broadcast to {used} by "
            f"{type(u).__name__}, so it was computed without a batch dimension although "
            f"its first dimension equals the batch size. indigrad cannot tell the two "
            "apart: give the layer inputs with a batch dimension of size 1, e.g. position "
            "ids of shape (1, T) instead of (T,)."
        )


def _boundary(leaves: Iterable[Any]) -> list[Any]:
    """Autograd nodes of the tensor inputs of a call, taken at call time."""
    nodes = []
    for t in leaves:
        if isinstance(t, torch.Tensor) and t.requires_grad:
            fn = t.grad_fn
            if fn is not None:
                nodes.append(fn)
            # a leaf's node is its gradient accumulator, which takes longer; a parameter's
            # is not a boundary. (isinstance of nn.Parameter runs Python, so only here.)
            elif not isinstance(t, nn.Parameter):
                nodes.append(get_gradient_edge(t).node)
    return nodes
