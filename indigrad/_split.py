"""The backward in parts, at calls whose rule gives the gradient at their input.

A recurrent layer's rule runs a backward through time by hand (``rules/recurrent.py``),
and that backward yields the gradient at the layer's input too. Yet the one backward
from the losses to every recorded call's output would run autograd's backward of the
layer as well, whenever a call below it (the token embedding under an LSTM) needs its
output's gradient: on a 2-layer LSTM or GRU classifier on CPU, a fifth of the step.

So the backward is split at such a call (a *cut*): first from the losses to every edge
not below the cut, the cut's outputs among them; then the cut's rule runs
(:class:`~indigrad.rules.registry.Split`) and gives the gradient at its input; then
from that input, with that gradient, to the edges below. Autograd never runs the cut's
own backward: nothing in the first part needs it, and the second starts under it.

This is exact only where the losses reach the graph below the cut through the cut's input
alone. :func:`plan` checks that for each candidate by walking the graph: from the losses
without entering the cut's outputs (a skip connection around the layer), and from its
other inputs (an initial state computed from below). Either leaves the call as it is: one
backward through it. What the call reads besides its inputs is the rule's to vouch for
(``Split.able``: a recurrent layer's weights must be its own parameters, not tensors
computed in the graph). Cuts below cuts (stacked recurrent modules) take one part each,
from the top down.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from ._graph import _ACCUMULATE


@dataclass(eq=False)
class Cut:
    """A call the backward is split at: its first input ``x``, the nodes the backward
    reaches from ``x`` (``below``), and the span of its edges in the requested list."""

    call: Any
    x: Tensor
    below: set[Any]
    span: range


def plan(
    root: Any,
    calls: Sequence[Any],
    spans: Sequence[range],
    edges: Sequence[GradientEdge],
    inputs: Callable[[Any], tuple[Any, ...]],
    raw: Callable[[Any], tuple[Any, ...]],
) -> list[Cut]:
    """The calls to split the backward at: those whose rule's ``split`` applies to them
    (``inputs(call)``: the rule's inputs; ``raw(call)``: the call's own arguments), with
    requested edges below them, and whose graph below the losses reach through the call
    alone. ``spans[k]`` is the range of ``calls[k]``'s edges in ``edges``."""
    if any(isinstance(e.node, _ACCUMULATE) for e in edges):
        return []  # a parameter's own edge: the walks below leave accumulators out
    cuts = []
    for call, span in zip(calls, spans, strict=True):
        rule = call.rule
        if rule is None or rule.split is None or call.shared is not None or call.views:
            continue
        args, own = raw(call), inputs(call)
        if not args or own[0] is not args[0] or not rule.split.able(call.module, own):
            continue  # the rule's input is not the graph's (converted to another precision)
        x = args[0]
        below = _reach([x.grad_fn])  # empty for a leaf
        if not any(edges[i].node in below for i in range(len(edges)) if i not in span):
            continue  # nothing below is asked for: the backward does not go there anyway
        outputs = {e.node for e in call.edges}
        if _reaches([root], below, outputs):
            continue  # a path around the call
        if _reaches([b for b in call.boundary if b is not x.grad_fn], below, set()):
            continue  # another input (an initial state) computed from the graph below
        cuts.append(Cut(call, x, below, span))
    return cuts


def _reach(start: list[Any]) -> set[Any]:
    """The nodes the backward reaches from ``start``, parameters' accumulators aside."""
    seen: set[Any] = set()
    stack = start
    while stack:
        u = stack.pop()
        if u is None or u in seen or isinstance(u, _ACCUMULATE):
            continue
        seen.add(u)
        stack.extend(v for v, _ in u.next_functions)
    return seen


def _reaches(start: list[Any], targets: set[Any], through: set[Any]) -> bool:
    """Whether the backward from ``start`` reaches any of ``targets`` without passing
    through a node of ``through``."""
    seen: set[Any] = set()
    stack = list(start)
    while stack:
        u = stack.pop()
        if u is None or u in seen or u in through:
            continue
        if u in targets:
            return True
        seen.add(u)
        stack.extend(v for v, _ in u.next_functions)
    return False


def backward(
    losses: Tensor,
    edges: Sequence[GradientEdge],
    cuts: list[Cut],
    resolve: Callable[[Cut, Sequence[Tensor | None]], Tensor | None],
) -> list[Tensor | None]:
    """The gradients at ``edges``, as one ``autograd.grad(losses.sum(), edges)`` gives
    them, in parts: each part from the losses (the first) or from the inputs of the cuts
    the last part reached, to the edges below no cut still pending. ``resolve(cut,
    grads)`` runs a cut's rule once its edges' gradients are known and returns the
    gradient at its input (None where none arrived)."""
    grads: list[Tensor | None] = [None] * len(edges)
    above = [[c for c in cuts if e.node in c.below] for e in edges]  # cuts each edge is below
    pending = list(cuts)
    todo = list(range(len(edges)))
    roots: list[Tensor] = [losses.sum()]
    seeds: list[Tensor | None] = [None]
    done: set[int] = set()
    while todo:
        ready = [i for i in todo if not any(c in pending for c in above[i])]
        if not ready:
            raise RuntimeError("indigrad: the split backward found no edges to reach")
        if roots:
            got = torch.autograd.grad(roots, [edges[i] for i in ready], seeds, allow_unused=True)
            for i, g in zip(ready, got, strict=True):
                grads[i] = g
        done.update(ready)
        todo = [i for i in todo if i not in done]
        roots, seeds = [], []
        for cut in [c for c in pending if all(i in done for i in c.span)]:
            pending.remove(cut)
            seed = resolve(cut, [grads[i] for i in cut.span])
            if seed is not None:
                roots.append(cut.x)
                seeds.append(seed)
    return grads
