"""Same-shaped calls taken together: the norms and weighted sums of stacked calls.

On a GPU, a small model's step is bound by the host issuing kernels, and each call's
norms and weighted sum issue several (a conv's: its im2col, three batched products, a
scaling and a weight gradient). Calls of one rule with the same shapes and options
(ResNet-18's convs within a stage: three or four of each) can be taken together, in the
same few operations over stacked tensors (:class:`~indigrad.rules.registry.Stack`).

Only calls that take their rule's fast paths are stacked, with each parameter used by
that call alone; the results are those of the calls taken one by one, up to the order
of floating-point sums. Rules whose small gradients are always materialised into the
joint (GroupNorm) may instead give a stack's gradients as blocks (:class:`JointStack`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

if TYPE_CHECKING:
    from .quantities import _Entry
    from .rules.registry import Stack


class _Stacked:
    """Calls taken together: their norms, then their weighted sums, each computed once."""

    def __init__(self, members: list[_Entry], stack: Stack) -> None:
        self.members, self.stack = members, stack
        self._sq: dict[int, dict[str, Tensor]] | None = None
        self._sums: tuple[Tensor, dict[int, dict[str, Tensor]]] | None = None

    def _args(self) -> tuple[list[Any], list[tuple[Any, ...]], list[Any]]:
        members = self.members
        return [e.call.module for e in members], [e.inputs for e in members], [e.G for e in members]

    def sq_norms(self, entry: _Entry) -> dict[str, Tensor]:
        if self._sq is None:
            results = self.stack.sq_norms(*self._args())
            self._sq = {
                id(e): e._own(r, "sq_norms") for e, r in zip(self.members, results, strict=True)
            }
        return self._sq[id(entry)]

    def weighted_sum(self, entry: _Entry, coef: Tensor) -> dict[str, Tensor]:
        if self._sums is None or self._sums[0] is not coef:
            results = self.stack.weighted_sums(*self._args(), coef)
            own = {
                id(e): e._own(r, "weighted_sum") for e, r in zip(self.members, results, strict=True)
            }
            self._sums = (coef, own)
        return self._sums[1][id(entry)]


# A stack's largest tensor may be at most this many times the largest that any one of
# the calls makes on its own (the peak memory of the norms is all calls' inputs and
# output gradients, held for the sums, plus that tensor). ResNet-18 on 32×32 images
# (n = 256, H200): stacking layer1's four convs too made the clipped step's peak memory
# 2.3× plain's against 1.1× (their im2col: 144 MiB, one conv's 36 MiB).
_GROWTH = 1.5


@dataclass
class Plan:
    """The stacks of one step's calls, by ``id`` of each member: for the norms, and for the
    weighted sums. A stack's weighted sums copy only its calls' inputs and output
    gradients side by side (a conv's: no im2col), so more calls fit in one under the same
    limit: ResNet-18's four layer1 convs take their sums together, and their norms apart."""

    norms: dict[int, _Stacked] = field(default_factory=dict)
    sums: dict[int, _Stacked] = field(default_factory=dict)


def plan(entries: list[_Entry]) -> Plan:
    """The stacks among ``entries`` (calls that take their rule's fast paths, each of
    their parameters used by that call alone): calls with one rule, one stack key and the
    same parameter names, two at least, as many together as :data:`_GROWTH` allows. For
    the norms, the tensor a stack makes is ``k`` times one call's largest; for the
    weighted sums, it is the calls' inputs and output gradients together."""
    groups: dict[Any, tuple[Stack, list[_Entry]]] = {}
    elements: dict[int, int] = {}
    for entry in entries:
        rule = entry.rule
        if rule is None or rule.stack is None or rule.prepare is not None:
            continue
        module = entry.call.module
        key = rule.stack.key(module, entry.inputs, entry.G)
        if key is not None:
            group = groups.setdefault((rule, tuple(entry.call.params), key), (rule.stack, []))
            group[1].append(entry)
            elements[id(entry)] = rule.stack.elements(module, entry.inputs, entry.G)
    limit = _GROWTH * max(elements.values(), default=0)
    stacks = Plan()
    for stack, members in groups.values():
        if len(members) < 2:
            continue
        # the members' own tensors are alike (one stack key): chunks of limit // each
        sizes = [max(elements[id(e)], 1) for e in members]
        _chunks(stacks.norms, stack, members, _fitting(sizes, limit))
        _chunks(stacks.sums, stack, members, _fitting([e.held() for e in members], limit))
    return stacks


def _fitting(sizes: list[int], limit: float) -> list[int]:
    """Consecutive chunks of items of ``sizes`` whose sums stay within ``limit`` (an item
    larger than that alone): the chunks' lengths."""
    lengths: list[int] = []
    total = 0
    for size in sizes:
        if lengths and total + size <= limit:
            lengths[-1] += 1
            total += size
        else:
            lengths.append(1)
            total = size
    return lengths


def _chunks(
    into: dict[int, _Stacked], stack: Stack, members: list[_Entry], lengths: list[int]
) -> None:
    """Stacks of ``members`` in consecutive chunks of ``lengths`` (which sum to their
    number), those of two or more."""
    start = 0
    for length in lengths:
        chunk = members[start : start + length]
        start += length
        if len(chunk) > 1:
            stacked = _Stacked(chunk, stack)
            into.update((id(e), stacked) for e in chunk)


# -- stacks of small gradients, for the joint ------------------------------------------


@dataclass(frozen=True)
class JointStack:
    """How a rule whose per-example gradients are small and always materialised (they go
    into the :class:`~indigrad._joint.Joint`) gives those of several calls of one shape
    at once (same-shaped GroupNorms on a GPU: one kernel call for a stage's four or five).

    Attributes:
        key: ``(module, inputs, G) -> Hashable | None``, equal for calls that can be taken
            together; None for a call that takes its own.
        grads: ``(modules, inputs, Gs, names) -> {local name: (n, k·P)}``, the ``k``
            calls' per-example gradients of each parameter in ``names`` (those captured)
            side by side, call after call, in the output gradients' dtype and device.
    """

    key: Callable[[nn.Module, tuple[Any, ...], Any], Any]
    grads: Callable[
        [list[nn.Module], list[tuple[Any, ...]], list[Any], set[str]], dict[str, Tensor]
    ]


# by id of the rule: the rules whose calls may be taken together into the joint (internal)
JOINT: dict[int, JointStack] = {}
