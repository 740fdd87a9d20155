"""Same-shaped calls taken together: the norms and weighted sums of stacked calls.

On a GPU, a small model's step is bound by the host issuing kernels, and each call's
norms and weighted sum issue several (a conv's: its im2col, three batched products, a
scaling and a weight gradient). Calls of one rule with the same shapes and options
(ResNet-18's convs within a stage: three or four of each) can be taken together, in the
same few operations over stacked tensors (:class:`~indigrad.rules.registry.Stack`).

Only calls that take their rule's fast paths are stacked, with each parameter used by
that call alone; the results are those of the calls taken one by one, up to the order
of floating-point sums.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:
    from .quantities import _Entry


class _Stacked:
    """Calls taken together: their norms, then their weighted sums, each computed once."""

    def __init__(self, members: list[_Entry]) -> None:
        self.members = members
        self._sq: dict[int, dict[str, Tensor]] | None = None
        self._sums: tuple[Tensor, dict[int, dict[str, Tensor]]] | None = None

    def _args(self) -> tuple[list[Any], list[tuple[Any, ...]], list[Any]]:
        members = self.members
        return [e.call.module for e in members], [e.inputs for e in members], [e.G for e in members]

    def sq_norms(self, entry: _Entry) -> dict[str, Tensor]:
        if self._sq is None:
            stack = self.members[0].rule.stack  # type: ignore[union-attr]
            results = stack.sq_norms(*self._args())  # type: ignore[union-attr]
            self._sq = {
                id(e): e._own(r, "sq_norms") for e, r in zip(self.members, results, strict=True)
            }
        return self._sq[id(entry)]

    def weighted_sum(self, entry: _Entry, coef: Tensor) -> dict[str, Tensor]:
        if self._sums is None or self._sums[0] is not coef:
            stack = self.members[0].rule.stack  # type: ignore[union-attr]
            results = stack.weighted_sums(*self._args(), coef)  # type: ignore[union-attr]
            own = {
                id(e): e._own(r, "weighted_sum") for e, r in zip(self.members, results, strict=True)
            }
            self._sums = (coef, own)
        return self._sums[1][id(entry)]


def plan(entries: list[_Entry]) -> dict[int, _Stacked]:
    """The stacks among ``entries`` (calls that take their rule's fast paths, each of
    their parameters used by that call alone), by ``id`` of each member: calls with one
    rule, one stack key and the same parameter names, in stacks as large as the rule lets
    two or more of them be."""
    groups: dict[Any, list[_Entry]] = {}
    for entry in entries:
        rule = entry.rule
        if rule is None or rule.stack is None or rule.prepare is not None:
            continue
        key = rule.stack.key(entry.call.module, entry.inputs, entry.G)
        if key is not None:
            groups.setdefault((rule, tuple(entry.call.params), key), []).append(entry)
    stacks: dict[int, _Stacked] = {}
    for members in groups.values():
        first = members[0]
        stack = first.rule.stack  # type: ignore[union-attr]
        size = len(members)
        while size > 1 and not stack.fits(first.call.module, first.inputs, first.G, size):  # type: ignore[union-attr]
            size -= 1
        for start in range(0, len(members), max(size, 1)):
            chunk = members[start : start + size]
            if len(chunk) > 1:
                stacked = _Stacked(chunk)
                stacks.update((id(e), stacked) for e in chunk)
    return stacks
