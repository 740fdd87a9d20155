"""The rule registry: which rule computes per-example quantities for which module class.

A rule is three small functions of ``(module, inputs, G)``:

- ``inputs`` is the tuple of the module call's positional arguments (keyword arguments
  bound into their positions, defaults filled in when the call used keywords), with the
  batch dimension moved to 0 on every tensor that has one.
- ``G`` is the gradient of the summed losses with respect to the module's output, batch
  dimension first: a tensor for a single-tensor output, otherwise the output's structure
  with tensors replaced by their gradients.

``grads`` is required; ``sq_norms`` and ``weighted_sum`` are optional fast paths. When
missing, or when the rule's ``materialise`` says so for a call, indigrad materialises the
per-example gradients once and derives both from them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from torch import Tensor, nn
from torch.autograd.graph import GradientEdge

GradsFn = Callable[[nn.Module, tuple[Any, ...], Any], dict[str, Tensor]]
SqNormsFn = Callable[[nn.Module, tuple[Any, ...], Any], dict[str, Tensor]]
WeightedSumFn = Callable[[nn.Module, tuple[Any, ...], Any, Tensor], dict[str, Tensor]]
MaterialiseFn = Callable[[nn.Module, tuple[Any, ...], Any, bool], bool]


@dataclass(frozen=True)
class Stack:
    """How a rule takes several calls of the same shape at once: their norms and weighted
    sums in a few larger operations rather than a few per call (on a GPU whose step is
    bound by the host issuing them). Calls are stacked only where the rule's own fast
    paths would be used for each.

    Attributes:
        key: ``(module, inputs, G) -> Hashable | None``, equal for calls that can be
            stacked together; None for a call that cannot be.
        elements: ``(module, inputs, G) -> int``, the elements of the largest tensor
            the call's norms make on their own; ``k`` calls stacked make one ``k`` times
            as large.
        sq_norms: ``(modules, inputs, Gs) -> [sq_norms of each call]``, as the rule's
            ``sq_norms`` gives them, for lists of calls with one ``key``.
        weighted_sums: ``(modules, inputs, Gs, coef) -> [weighted_sum of each call]``,
            disjoint views of buffers made for them (each becomes a ``.grad`` uncopied).
    """

    key: Callable[[nn.Module, tuple[Any, ...], Any], Any]
    elements: Callable[[nn.Module, tuple[Any, ...], Any], int]
    sq_norms: Callable[[list[nn.Module], list[tuple[Any, ...]], list[Any]], list[dict[str, Tensor]]]
    weighted_sums: Callable[
        [list[nn.Module], list[tuple[Any, ...]], list[Any], Tensor], list[dict[str, Tensor]]
    ]


@dataclass(frozen=True)
class Rule:
    """How to finish the backward of one layer family per example.

    Attributes:
        grads: ``(module, inputs, G) -> {param_name: (n, *param.shape)}``, per-example
            gradients of the module's own parameters for this call.
        sq_norms: ``(module, inputs, G) -> {param_name: (n,)}``, per-example squared norms
            of those gradients without materialising them. Optional.
        weighted_sum: ``(module, inputs, G, coef) -> {param_name: param.shape}``, the sum
            ``Σ_i coef[i] · g_i`` without materialising the ``g_i``. Optional.

        raw_layout: the rule receives ``inputs`` and ``G`` exactly as the module saw and
            returned them (no batch dimension moved, no batch-size check), for layers
            with a layout of their own (``batch_first=False`` attention and RNNs,
            ``PackedSequence``, ``EmbeddingBag`` with offsets). It finds ``n`` itself.
        subtree: the rule accounts for every trainable parameter in the module's subtree
            (keys are dotted names relative to the module, e.g. ``"out_proj.weight"``),
            for layers that use their children's parameters functionally, like
            ``nn.MultiheadAttention``. Descendants are then not recorded separately.
        supports: ``module -> bool``; when it returns False for a module (an option the
            rule does not cover), that module goes to the generic rule instead.
        materialise: ``(module, inputs, G, clipping) -> bool``, the per-call cost choice:
            True when materialising the per-example gradients once (and taking the norms
            and the weighted sum from them) is cheaper than ``sq_norms`` and
            ``weighted_sum``. ``clipping`` says whether the weighted sum will be asked
            for too (a clipped sum) or only the norms. Without it the fast paths are used.
        saved: ``node -> Any``, called with the autograd node of the call's first output
            before the backward frees what that node saved, for a rule that reuses what
            the forward computed (GroupNorm's statistics). Its result comes last in the
            rule's ``inputs``; a rule called without a recorded graph gets no such entry.
        prepare: ``(module, inputs, G) -> Any``, for rules whose three functions start with
            the same expensive work (a recurrence or an attention core recomputed): run
            once per call, the first time one of them is asked for, and its result is
            passed to them as ``Prepared(result)`` in place of ``G``. In the functions,
            :func:`prepared` gives the result either way (computing it for a function
            called directly, with ``G`` itself).
        inner: ``(module, node, stop) -> Inner | None``, called like ``saved`` (``stop``:
            the nodes of the call's tensor inputs, where the call's part of the graph
            ends), for a rule that reads the forward's intermediate results and the
            gradients at edges inside the call rather than recomputing them
            (``nn.MultiheadAttention``'s input projection). The gradients at
            ``Inner.edges`` come from the same backward as ``G``; the rule's ``inputs``
            then end with ``Taken(value, grads)``. None (or no ``inner``): no such entry,
            and the rule works from its inputs alone.
        stack: a :class:`Stack`, for a rule that can take same-shaped calls together.
        output: the rule's ``inputs`` end with ``Output(value)``, the call's output as
            the forward returned it (its tensors detached), for a rule that reads what
            the forward computed rather than computing it again (a recurrent layer's
            top-layer states). Where an in-place op changed the output after the call
            (``out += x``), there is no such entry.
        split: a :class:`Split`, for a rule with a ``prepare`` whose work yields the
            gradient at the call's input as well (a recurrence's backward through time):
            the backward below the call then starts from that gradient, and autograd's
            backward of the call itself is never run.

    Every function only needs to return entries for the module's trainable parameters;
    extra entries for frozen parameters are ignored. Results must be new tensors, not
    views of the inputs or of state the rule keeps: a weighted sum may become ``p.grad``.
    """

    grads: GradsFn
    sq_norms: SqNormsFn | None = None
    weighted_sum: WeightedSumFn | None = None
    raw_layout: bool = False
    subtree: bool = False
    supports: Callable[[nn.Module], bool] | None = None
    materialise: MaterialiseFn | None = None
    saved: Callable[[Any], Any] | None = None
    inner: Callable[[nn.Module, Any, Sequence[Any]], Inner | None] | None = None
    prepare: Callable[[nn.Module, tuple[Any, ...], Any], Any] | None = None
    stack: Stack | None = None
    output: bool = False
    split: Split | None = None


class Split(NamedTuple):
    """How a rule gives the gradient at its call's first input from its own work.

    The backward then runs in two parts: from the losses to the call's outputs (and every
    edge not below the call), then from that gradient at the input to the edges below,
    so that autograd's backward of the call (a fused RNN kernel's, say) is skipped.
    indigrad splits only where every path from the losses to the graph below the call
    passes through the call's first input.

    Attributes:
        able: ``(module, inputs) -> bool``, before the backward: whether ``run`` will
            give the input's gradient for this call (``inputs`` as the rule gets them,
            without ``G``). True only where the call reads nothing that requires grad
            but its inputs and its module's own parameters (not tensors computed in the
            graph, as a parametrization's are): indigrad checks the inputs' paths, not
            what the module reads otherwise.
        run: ``(module, inputs, G) -> (prepared, grad)``: the rule's ``prepare`` result
            for the call, and the gradient at ``inputs[0]`` (its shape and layout),
            None where none reaches it.
    """

    able: Callable[[nn.Module, tuple[Any, ...]], bool]
    run: Callable[[nn.Module, tuple[Any, ...], Any], tuple[Any, Tensor | None]]


class Inner(NamedTuple):
    """What a rule's ``inner`` found in the graph before the backward: a value of its
    own (saved tensors, say) and edges inside the call whose gradients it needs."""

    value: Any
    edges: tuple[GradientEdge, ...]


class Prepared(NamedTuple):
    """A rule's ``prepare`` result for a call, as its functions receive it in place of ``G``."""

    value: Any


def prepared(
    prepare: Callable[[nn.Module, tuple[Any, ...], Any], Any],
    module: nn.Module,
    inputs: tuple[Any, ...],
    G: Any,
) -> Any:
    """In a rule's function: what ``prepare`` gives for this call, handed over by indigrad
    (``G`` is then :class:`Prepared`) or computed now (``G`` is the output gradient)."""
    return G.value if isinstance(G, Prepared) else prepare(module, inputs, G)


class Output(NamedTuple):
    """The last of a rule's ``inputs`` when the rule asks for its call's output
    (``Rule.output``): the output's structure, its tensors detached."""

    value: Any


class Taken(NamedTuple):
    """The last of a rule's ``inputs`` when its ``inner`` found something: the value, and
    the gradients at its edges (None where the losses do not reach one)."""

    value: Any
    grads: tuple[Tensor | None, ...]


_RULES: dict[type[nn.Module] | str, Rule] = {}
_BY_CLASS: dict[type[nn.Module], Rule | None] = {}  # lookups by module class, until the next change


def register_rule(
    cls: type[nn.Module] | str,
    rule: Rule | None = None,
    *,
    grads: GradsFn | None = None,
    sq_norms: SqNormsFn | None = None,
    weighted_sum: WeightedSumFn | None = None,
    raw_layout: bool = False,
    subtree: bool = False,
    supports: Callable[[nn.Module], bool] | None = None,
    materialise: MaterialiseFn | None = None,
) -> Rule:
    """Register the rule that handles modules of class ``cls`` (and subclasses that keep its
    ``forward``). Registering a class again replaces its rule.

    ``cls`` may also be the class's qualified name, ``"package.module.Class"``, for classes
    of optional libraries (e.g. ``"transformers.pytorch_utils.Conv1D"``): the library need
    not be installed or imported to register a rule for it.

    Pass either a :class:`Rule` or its functions as keywords.

    Example:
        >>> import torch, indigrad
        >>> class Scale(torch.nn.Module):            # y = x * s on (n, d) inputs
        ...     def __init__(self, d):
        ...         super().__init__()
        ...         self.s = torch.nn.Parameter(torch.ones(d))
        ...     def forward(self, x):
        ...         return x * self.s
        >>> def scale_grads(module, inputs, G):     # ∂(G_i · x_i s)/∂s = x_i ⊙ G_i
        ...     return {"s": inputs[0] * G}         # (n, d)
        >>> rule = indigrad.register_rule(Scale, grads=scale_grads)
        >>> indigrad.lookup_rule(Scale(3)) is rule
        True
        >>> indigrad.unregister_rule(Scale)
    """
    if rule is None:
        if grads is None:
            raise TypeError("register_rule needs a Rule or at least grads=")
        rule = Rule(grads, sq_norms, weighted_sum, raw_layout, subtree, supports, materialise)
    elif any(f is not None for f in (grads, sq_norms, weighted_sum, materialise)):
        raise TypeError("pass either a Rule or its functions as keywords, not both")
    if not (isinstance(cls, str) or (isinstance(cls, type) and issubclass(cls, nn.Module))):
        raise TypeError(f"rules are registered for nn.Module subclasses, got {cls!r}")
    _RULES[cls] = rule
    _BY_CLASS.clear()
    return rule


def unregister_rule(cls: type[nn.Module] | str) -> None:
    """Remove the rule registered for exactly ``cls`` (a class or a qualified name)."""
    del _RULES[cls]
    _BY_CLASS.clear()


def registered_rules() -> dict[type[nn.Module] | str, Rule]:
    """The module classes (or qualified class names) that have a rule, in registration
    order (a copy)."""
    return dict(_RULES)


def lookup_rule(module: nn.Module) -> Rule | None:
    """The rule for ``module``, found through its class's MRO, or ``None`` (generic rule).

    A subclass matches its parent's rule only when it does not override ``forward``: a
    subclass that computes something else must not inherit the parent's math silently.
    A rule whose ``supports(module)`` is False leaves the module to the generic rule.
    """
    cls = type(module)
    if cls not in _BY_CLASS:
        _BY_CLASS[cls] = _class_rule(cls)
    rule = _BY_CLASS[cls]
    if rule is not None and rule.supports is not None and not rule.supports(module):
        return None
    return rule


def _class_rule(cls: type[nn.Module]) -> Rule | None:
    for base in cls.__mro__:
        rule = _RULES.get(base) or _RULES.get(f"{base.__module__}.{base.__qualname__}")
        if rule is not None:
            if base is not cls and cls.forward is not getattr(base, "forward", None):
                return None
            return rule
    return None
