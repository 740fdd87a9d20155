"""Recording the forward and running the one backward.

Inside ``with capture(model) as cap:`` every module that owns trainable parameters has a
forward hook. Each call records its inputs and the autograd edge of each output tensor,
taken *at hook time* (so an in-place op after the layer, such as ``ReLU(inplace=True)``,
cannot change which gradient is read). A backward-consuming call then asks autograd for
the gradients at those edges only, which skips the ordinary weight gradients entirely,
and hands ``(module, inputs, G)`` to each layer's rule.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.nn.modules.module import register_module_forward_hook
from torch.nn.utils.parametrize import ParametrizationList
from torch.utils._pytree import TreeSpec, tree_flatten, tree_map, tree_unflatten

from . import _reparam, _shared, _split, _verify
from ._batch import has_batch
from ._graph import (
    View,
    _batch_dims,
    _boundary,
    _check_accounted,
    check_exits,
    confirm_batch,
    consumers_of,
)
from ._host import gc_paused
from ._precision import RULES_RUNNING
from .quantities import PerExample, rule_G, rule_inputs
from .rules import Prepared, Rule, lookup_rule
from .rules import direct as _direct
from .rules.generic import own_attributes

# where a captured parameter sits: the _parameters dict of the module holding it, its key
_Slot = tuple[dict[str, Any], str, nn.Parameter]
# a module owning captured parameters: the module, its name, those parameters, its rule,
# and their slots
_Plan = tuple[nn.Module, str, dict[str, nn.Parameter], "Rule | None", tuple[_Slot, ...]]


@dataclass(eq=False, slots=True)
class _Call:
    """One recorded call of a module that owns trainable parameters."""

    module: nn.Module
    name: str  # qualified name in the model ("" for the model itself)
    params: dict[str, nn.Parameter]  # the module's own trainable parameters, by local name
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    out_spec: TreeSpec
    out_leaves: Sequence[Any]  # output leaves; those with an edge replaced by None
    edge_index: Sequence[int]  # which output leaves have an edge
    edges: list[GradientEdge]
    boundary: list[Any]  # autograd nodes of the tensor inputs, at call time
    versions: list[tuple[Tensor, int]]  # tensor inputs and their version counters at call time
    # called without the batch dimension (its output shared by all examples): the call's
    # own arguments and output shapes, before its inputs were expanded for the rules
    shared: tuple[tuple[Any, ...], dict[str, Any], list[torch.Size]] | None = None
    # on tensors made inside the model whose batch dimension could be chance: the backward
    # follows it to the batch's (``_graph.confirm_batch``); "ids", "floats" or "inputs", see
    # ``capture._questioned``
    questioned: str = ""
    training: bool = True  # the module's mode at call time
    rule: Rule | None = None  # its rule, looked up once when the capture began; None: generic
    saved: Any = None  # what the rule's ``saved`` took from the graph before the backward
    grad_outputs: tuple[Tensor | None, ...] = ()
    # no rule: the uses of its parameters, where the generic rule's fast path applies
    direct: list[_direct.Use] | None = None
    rerun_because: str = ""  # why not: for the generic rule's messages
    rerun_param: str = ""  # the parameter that needs it
    adopted: tuple[str, ...] = ()  # parameters of modules inside, used by this call's own code
    # why it takes the parameters of calls inside it without the batch dimension (and is
    # re-run), where their outputs' paths to the batch cannot be followed
    absorbed: str = ""
    # per edge, for outputs that view a whole tensor: that tensor's edge and the view
    # (None where no output does); the edges whose gradient is read there instead, after an
    # in-place op rebuilt the view's history (``_graph._rebased``), and their views
    bases: list[Any] | None = None
    views: dict[int, View] = field(default_factory=dict)
    inner_value: Any = None  # what the rule's ``inner`` found (None: nothing)
    inner: list[GradientEdge] = field(default_factory=list)  # edges inside the call
    inner_grads: tuple[Tensor | None, ...] = ()  # their gradients
    prepared: Prepared | None = None  # the rule's ``prepare`` result, where the backward split
    # the call's output, detached, and its tensors' versions, for a rule that asks for it
    output: tuple[Any, list[tuple[Tensor, int]]] | None = None
    # no rule: the module's own attributes as the call began, which the generic rule's
    # re-runs read (a parent may set them before each call: a shared block's dilation),
    # and the version counters of those that are tensors
    attrs: tuple[dict[str, Any], dict[str, int]] | None = None
    # its name, how it was read, and its tensor arguments', outputs' and parameters' shapes
    sig: tuple[Any, ...] = ()
    # a step whose batch reading is checked: the re-run check of a call without a rule
    verify: _verify.Pending | None = None

    @property
    def label(self) -> str:
        return _label(self.module, self.name)

    @property
    def broadcast(self) -> bool:
        """Called without the batch dimension: its outputs shared by all examples."""
        return self.shared is not None


def _unrecorded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Record no call while ``fn`` runs: reading a tensor that activation checkpointing
    did not keep re-runs its region's forward, whose calls are not this step's."""

    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self._pause():
            return fn(self, *args, **kwargs)

    return wrapper


class capture:
    """Record a model's forward so that per-example quantities can be computed from it.

    Use it as a context manager; hooks exist only inside the ``with`` block and the model
    is left exactly as it was on exit, also when an exception escapes the block.

    Args:
        model: any ``nn.Module``. Every trainable parameter (``requires_grad=True``) is
            captured, under its name in ``model.named_parameters()``.
        batch_dim: the dimension that indexes examples in the inputs and outputs of
            plain layers (0 by default; 1 for sequence-first models).
        params: capture only these trainable parameters (names or the parameters
            themselves), e.g. the last layer's: the backward then stops where they stop
            needing gradients, and every quantity covers just them. The others are
            treated as frozen for this capture.
        verify: when to check that the rows taken for examples are the examples'
            (``indigrad/_verify.py``): ``"new"`` (the default) at the first step of each
            new pattern of sizes (which dimensions of the layers' inputs and outputs have
            as many entries as the batch, or one), for each model; ``"always"`` at every
            step; ``"never"``. A check runs one more backward, of the losses weighted per
            example, to the layers' outputs only, and compares; a layer's rows that are
            not its examples' (a table, positions or tokens as many as the examples; a
            loss that reads other examples' outputs) raise instead of giving wrong
            numbers. A checked step holds the graph until its second backward, waits for
            the device once, and runs the program's backward hooks twice, first with the
            weighted losses' gradients (a hook that clamps gradients makes the check fail:
            pass ``"never"`` for such a model).

    Each of :meth:`grads`, :meth:`norms` and :meth:`clip_` runs exactly one backward over
    the forward recorded since the previous one (two at a checked step, see ``verify``).
    To get several quantities from one backward, call :meth:`backward` and ask the
    returned :class:`PerExample`.

    Example:
        >>> import torch, torch.nn.functional as F, indigrad
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> with indigrad.capture(model) as cap:
        ...     grads = cap.grads(F.cross_entropy(model(x), y, reduction="none"))
        >>> grads["0.weight"].shape                    # one gradient per example
        torch.Size([16, 8, 4])
        >>> with indigrad.capture(model) as cap:
        ...     norms = cap.clip_(F.cross_entropy(model(x), y, reduction="none"), max_norm=1.0)
        >>> norms.shape, model[0].weight.grad.shape    # pre-clip norms; clipped sum in .grad
        (torch.Size([16]), torch.Size([8, 4]))
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        batch_dim: int = 0,
        params: Iterable[str | nn.Parameter] | None = None,
        verify: str = "new",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"capture expects an nn.Module, got {type(model).__name__}")
        if batch_dim < 0:
            raise ValueError(f"batch_dim must be a non-negative dimension, got {batch_dim}")
        if verify not in _verify.MODES:
            raise ValueError(f"verify must be one of {_verify.MODES}, got {verify!r}")
        self.model = model
        self.verify = verify
        self.batch_dim = batch_dim
        self._only = None if params is None else frozenset(_select(model, params))
        self._handles: list[Any] = []
        self._calls: list[_Call] = []
        self._active = False
        self._paused = False
        self._consumed = False
        self._n: int | None = None  # batch size of the model's current forward
        self._inputs: Any = None  # the model's arguments in its current forward
        # the model's forwards since the last backward, whether one had more than one
        # tensor argument of the batch's size, and where in the storages of its inputs
        # recorded calls read: where it ran more than once, had such arguments, or calls
        # read more than one input or part of one, which rows are the examples' is a
        # question (a support set, a table handed in beside the batch or sliced from it)
        self._entries = 0
        self._running = False  # inside the model's forward
        self._several = False
        self._read: set[tuple[int, int]] = set()  # (storage, offset)
        self._ddp_sync: bool | None = None  # DDP's own gradient sync flag, while we hold it
        self._names: dict[int, str] = {}  # id(param) -> name, trainable only
        self._params: dict[str, nn.Parameter] = {}
        # id(module) -> a module without a rule's own attributes as its call began
        self._attrs: dict[int, tuple[dict[str, Any], dict[str, int]]] = {}

    # -- the context --------------------------------------------------------------------

    def __enter__(self) -> capture:
        if self._active:
            raise RuntimeError("this capture is already active; create a new one per block")
        modules = list(self.model.named_modules())
        self._params, self._names = _trainable(modules, self._only)
        plan: dict[int, _Plan] = {}  # id(module) -> what its calls record
        try:
            self._handles.append(
                self.model.register_forward_pre_hook(self._batch_size, with_kwargs=True)
            )
            self._handles.append(self.model.register_forward_hook(self._ended, always_call=True))
            skip: str | None = None  # the subtree of a module whose rule owns it
            lists: tuple[str, ...] = ()  # the subtrees of parametrizations
            for name, module in modules:
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    self._handles.append(module.register_forward_pre_hook(self._bn_check(name)))
                if skip is not None and name.startswith(skip):
                    continue
                if isinstance(module, ParametrizationList):
                    lists = (*lists, f"{name}.")
                    continue  # its parameters are its parametrized module's
                if name.startswith(lists):
                    continue  # a parametrization: its parameters are the module's too
                if module._forward_pre_hooks:
                    _refuse_hook_reparametrization(name, module)
                rule = lookup_rule(module)
                whole = rule is not None and rule.subtree
                if whole:
                    skip = f"{name}." if name else ""
                own = _own_params(module, whole, self._names)
                if own:
                    plan[id(module)] = (module, name, own, rule, _slots(module, own))
                    if rule is None:  # the generic rule re-runs it with these attributes
                        self._handles.append(module.register_forward_pre_hook(self._begun))
            if plan:
                # One hook for all modules rather than one per module: registering and
                # removing dozens of hooks is host time on every step. Global hooks run
                # before every module's own, so it records the output a module
                # computed, not one a hook of the user's put in its place.
                self._handles.append(_GlobalHook(self._recorder(plan)))
        except BaseException:
            self._remove()
            raise
        if isinstance(self.model, nn.parallel.DistributedDataParallel):
            # indigrad all-reduces the clipped sums itself; DDP's reducer must not wait
            # for a weight-gradient backward that never comes (what `no_sync()` does).
            self._ddp_sync = self.model.require_backward_grad_sync
            self.model.require_backward_grad_sync = False
        self._active = True
        self._consumed = False
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._remove()

    @property
    def _process_group(self) -> Any:
        """The process group to average clipped sums over, for a DDP model."""
        if isinstance(self.model, nn.parallel.DistributedDataParallel):
            return self.model.process_group
        return None

    def _remove(self) -> None:
        if self._ddp_sync is not None:
            setattr(self.model, "require_backward_grad_sync", self._ddp_sync)  # noqa: B010
            self._ddp_sync = None
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._calls.clear()
        self._attrs.clear()
        self._active = False

    @contextmanager
    def _pause(self) -> Iterator[None]:
        """Stop recording while rules re-run module forwards (the generic rule)."""
        paused, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = paused

    # -- recording ----------------------------------------------------------------------

    def _begun(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        """Keep a module's own attributes as its call begins (a forward may change them: a
        count of calls), and its tensors' versions, for the generic rule's re-runs."""
        attrs = own_attributes(module)
        versions = {k: v._version for k, v in attrs.items() if isinstance(v, Tensor)}
        self._attrs[id(module)] = attrs, versions

    def _bn_check(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if self._paused or not torch.is_grad_enabled():
                return
            if module.training:
                raise RuntimeError(
                    f"{type(module).__name__} {name!r} is in training mode: its batch "
                    "statistics mix the examples of a batch, so no per-example gradient "
                    "exists. Put it in eval mode (model.eval(), or module.eval() for the "
                    "norm layers only) or replace it with GroupNorm / LayerNorm."
                )
            if module.running_mean is None and module.running_var is None:
                raise RuntimeError(
                    f"{type(module).__name__} {name!r} has track_running_stats=False, so "
                    "it normalises with batch statistics even in eval mode, which mixes "
                    "the examples of a batch. Use track_running_stats=True (and eval mode) "
                    "or replace it with GroupNorm / LayerNorm."
                )

        return hook

    def _batch_size(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """The model's batch size, from the first tensor argument with a batch dimension."""
        if self._paused:
            return
        self._n, self._inputs = None, (args, kwargs)
        self._entries += 1
        self._running = True
        bd = self.batch_dim
        first = args[0] if args else None
        if isinstance(first, Tensor) and first.dim() > bd:  # the common case
            self._n = first.shape[bd]
            if len(args) == 1 and not kwargs:
                return
        leaves = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        if self._n is None:
            self._n = next((t.shape[bd] for t in leaves if t.dim() > bd), None)
        n = self._n
        if n is not None and len({id(t) for t in leaves if has_batch(t, n, bd)}) > 1:
            self._several = True

    def _ended(self, model: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self._running = False

    def _questioned(self, leaves: list[Any], n: int) -> str:
        """For a call on tensors none of which requires grad, judged batched because
        dimension ``batch_dim`` has ``n`` entries: whether a tensor among them could have
        them by chance, not being the model's own input or a view of it that keeps its
        batch dimension. The backward then follows that dimension to the batch's
        (``_graph.confirm_batch``). ``"ids"`` for an integer tensor (shifted decoder ids; a
        table of relative positions ``(T, T)`` with ``T = n``; transposed ids): it must be
        followed there. ``"floats"`` for a floating one (a coordinate table of ``T = n``
        rows, or the model's input rescaled inside the forward, or a frozen backbone's
        features): only a dimension found to end elsewhere is refused, since the ops of a
        batched input are many and not all are followed. ``"inputs"`` for the model's own
        inputs: followed as floating ones are where the model ran more than once, or had
        more than one tensor argument of the batch's size, or its calls read more than one
        of its inputs or parts of one, before the backward. ``""`` for none."""
        bd = self.batch_dim
        roots = None
        found = ""
        args = self._inputs[0] if self._inputs is not None else ()
        first = args[0] if args else None  # the model's input itself: the common case
        for t in leaves:
            if not isinstance(t, Tensor) or t.dim() <= bd or t.shape[bd] != n:
                continue
            storage = t.untyped_storage().data_ptr()
            part = (storage, int(t.storage_offset()))  # where in it: a slice is a part
            if t is first:
                self._read.add(part)
                found = found or "inputs"
                continue
            if roots is None:
                roots = [r for r in tree_flatten(self._inputs)[0] if isinstance(r, Tensor)]
            stride = t.stride(bd)
            if any(
                r.dim() > bd
                and r.untyped_storage().data_ptr() == storage
                and r.stride(bd) == stride
                for r in roots
            ):
                self._read.add(part)
                found = found or "inputs"
            elif not (t.is_floating_point() or t.is_complex()):
                return "ids"
            else:
                found = "floats"
        return found

    def _recorder(self, plan: dict[int, _Plan]) -> Any:
        bd = self.batch_dim

        def hook(
            module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
        ) -> Any:
            planned = plan.get(id(module))  # by identity, whatever __eq__ a class defines
            if planned is None or planned[0] is not module or self._paused:
                return None  # a module without captured parameters, or another model's
            if torch._C._current_graph_task_id() != -1 or RULES_RUNNING.get():
                # a forward re-run inside a backward or while rules read saved tensors
                # (activation checkpointing's recomputation): not a call of this step's
                return None
            _, name, own, rule, slots = planned
            raw = rule is not None and rule.raw_layout
            edge_index: Sequence[int]
            if isinstance(output, Tensor):  # the common case, without pytree's cost
                if not output.requires_grad:
                    return None  # no_grad, or nothing differentiable came out
                leaves, spec, edge_index = [output], _TENSOR_SPEC, _FIRST
            else:
                leaves, spec = tree_flatten(output)
                edge_index = [
                    i for i, t in enumerate(leaves) if isinstance(t, Tensor) and t.requires_grad
                ]
                if not edge_index:
                    return None
                if rule is None and len(edge_index) > 1:
                    # The generic rule re-runs the call with each output's gradient. Where
                    # one output is computed from another (LSTMCell's h from its c), or
                    # is returned twice, the gradient autograd gives at an output also
                    # holds the paths through the others, which the re-run takes again.
                    # Each output is handed on as a copy, so that what arrives at it is
                    # what arrives from outside the call.
                    leaves = [t.clone() if i in edge_index else t for i, t in enumerate(leaves)]
                    output = tree_unflatten(leaves, spec)
            if not kwargs and len(args) == 1 and isinstance(args[0], Tensor):  # the common case
                x = args[0]
                in_leaves, in_spec = [x], None
                versions = [(x, x._version)]
                fn = x.grad_fn  # a layer's input made by the layer before: its node
                boundary = [fn] if fn is not None else _boundary(in_leaves)
            else:
                if kwargs or not all(isinstance(a, Tensor) for a in args):
                    in_leaves, in_spec = tree_flatten((args, kwargs))
                else:
                    in_leaves, in_spec = list(args), None
                versions = [(t, t._version) for t in in_leaves if isinstance(t, Tensor)]
                boundary = _boundary(in_leaves)
            n = self._n
            broadcast = False
            questioned = ""
            if not raw and n is not None:
                if spec is _TENSOR_SPEC:  # the common case, without a generator's cost
                    batched = output.dim() > bd and output.shape[bd] == n
                else:
                    batched = any(has_batch(leaves[i], n, bd) for i in edge_index)
                broadcast = (  # the output first: batched, it settles the question
                    not batched
                    and (
                        not any(has_batch(t, n, bd) for t in in_leaves)
                        # batched inputs read for their shape only (BART's decoder
                        # positions): every output has one entry in the batch dimension
                        or all(_one_entry(leaves[i], bd) for i in edge_index)
                    )
                )
                if (  # boundary: an input from the graph, the common case
                    batched
                    and not boundary
                    # inputs that do not require grad, or parameters (a trainable table of
                    # class prototypes with as many rows as examples) but for one example,
                    # where a dimension of one entry may be taken for the batch
                    and (
                        n > 1
                        or not any(isinstance(t, Tensor) and t.requires_grad for t in in_leaves)
                    )
                ):
                    questioned = self._questioned(in_leaves, n)
                if (
                    batched
                    and n > 1  # one example: every gradient is its own
                    and not any(has_batch(t, n, bd) for t in in_leaves)  # (first: common)
                    and any(isinstance(t, Tensor) for t in in_leaves)
                ):
                    _refuse_batch_made(module, name, output if spec is _TENSOR_SPEC else None)
            if not self._running and not boundary and not broadcast:
                # a layer called outside the model's forward (a support set encoded by a
                # submodule beside the model's run): another run on the model's inputs
                self._entries += 1
                questioned = questioned or "inputs"
            shared = None
            if broadcast:
                # A call whose output all examples share (a position embedding of
                # arange(T)): its per-example gradients are read where the output meets
                # the batch (_shared.py). The forward is left as it is; the rules see the
                # call's inputs expanded to the batch, an ordinary batched call (the
                # generic rule takes the call as it was).
                assert n is not None
                shared = (args, kwargs, [leaves[i].shape for i in edge_index])
                in_leaves = [
                    _expand(t, n, bd) if isinstance(t, Tensor) and not has_batch(t, n, bd) else t
                    for t in in_leaves
                ]
                if in_spec is None:
                    args = tuple(in_leaves)
                else:
                    args, kwargs = tree_unflatten(in_leaves, in_spec)
            for held, key, p in slots:  # each as it was on entering the block
                if held.get(key) is not p:
                    _refuse_replaced(module, name, key)
            # what the batch reading depends on, for _verify: how the call was read, its
            # tensor arguments', outputs' and parameters' shapes
            sig = (
                name,
                questioned,
                broadcast,
                *[t.shape for t, _ in versions],
                *[leaves[i].shape for i in edge_index],
                *[p.shape for p in own.values()],
            )
            self._calls.append(
                _Call(
                    module=module,
                    name=name,
                    params=own,
                    args=args,
                    kwargs=kwargs,
                    out_spec=spec,
                    # differentiable outputs are replaced by their gradients later; the rest
                    # (a PackedSequence's batch_sizes, say) stay as they were
                    out_leaves=_NO_LEAF
                    if spec is _TENSOR_SPEC
                    else [None if i in edge_index else t for i, t in enumerate(leaves)],
                    edge_index=edge_index,
                    edges=[_edge(leaves[i]) for i in edge_index],
                    bases=_bases(leaves, edge_index),
                    boundary=boundary,
                    versions=versions,
                    shared=shared,
                    questioned=questioned,
                    training=module.training,
                    rule=rule,
                    output=_kept(output) if rule is not None and rule.output else None,
                    attrs=None if rule is not None else self._attrs.pop(id(module), None),
                    sig=sig,
                )
            )
            self._consumed = False
            return output if rule is None and len(edge_index) > 1 else None

        return hook

    # -- the backward -------------------------------------------------------------------

    @gc_paused
    @_unrecorded
    def backward(self, losses: Tensor) -> PerExample:
        """Run the one backward over the recorded forward and return its per-example view.

        Args:
            losses: ``(n,)`` or ``(n, ...)``, one loss per example (trailing dims are summed
                per example, e.g. token losses into a sequence loss). Use
                ``reduction="none"`` in the loss function.

        Returns:
            A :class:`PerExample` from which ``grads()``, ``norms()`` and ``clip_()`` can
            all be taken without another backward.
        """
        if not self._active:
            raise RuntimeError(
                "capture is not active: use it as `with indigrad.capture(model) as cap:` and "
                "run the forward and the backward-consuming call inside the block"
            )
        losses = _check_losses(losses)
        if not self._calls:
            if self._consumed:
                raise RuntimeError(
                    "the forward recorded in this capture was already consumed by a "
                    "backward; run the forward again inside the capture before asking for "
                    "another quantity (or take several from one cap.backward(losses))"
                )
            raise RuntimeError(
                "no forward was recorded in this capture: run the model inside the `with "
                "indigrad.capture(model)` block, with gradients enabled and at least one "
                "trainable parameter"
            )
        calls, self._calls = self._calls, []
        self._consumed = True
        several = self._entries > 1 or self._several or len(self._read) > 1
        self._entries, self._several, self._read = 0, False, set()
        n, bd = losses.shape[0], self.batch_dim
        if losses.grad_fn is None:
            raise RuntimeError(
                "the losses do not depend on any trainable parameter (they have no grad_fn)"
            )
        # the consumers of shared outputs, where the search for their meets starts
        consumers: dict[Any, list[Any]] = {
            (e.node, e.output_nr): [] for c in calls if c.shared is not None for e in c.edges
        }
        regions: dict[Any, set[Any]] = {}
        calls, uses = _check_accounted(
            losses.grad_fn, calls, self._names, consumers, regions, (n, bd)
        )
        for call in calls:
            if call.module.training != call.training:
                raise RuntimeError(
                    f"{call.label} was switched to {'training' if call.module.training else 'eval'}"
                    " mode between the forward and the backward; its rule would compute for "
                    "the wrong mode. Switch modes before the forward."
                )
            for t, version in call.versions:
                if t._version != version:
                    raise RuntimeError(
                        f"an input of {call.label} was modified in place after the call "
                        "(e.g. `x += ...`, `relu_(x)`), so its recorded input is no longer "
                        "the one the layer saw. Use an out-of-place op there."
                    )
        graph: list[Any] = []

        def whole() -> Any:
            """The whole graph read forward, for the checks below that need it: built
            once, when first asked for (a plain closure: ``functools.cache`` costs more)."""
            if not graph:
                graph.append(consumers_of(losses.grad_fn))
            return graph[0]

        questioned = [
            call
            for call in calls
            if call.questioned
            # the model's inputs: where which rows are examples is a question, and where
            # the call has the losses' rows (others are refused below)
            and (
                call.questioned != "inputs"
                or (several and n > 1 and any(_rows(e, bd) == n for e in call.edges))
            )
        ]
        if questioned:
            sure = [c for c in calls if c.questioned in ("", "inputs") and c.shared is None]
            batched = {node: call for call in sure for node in call.boundary}
            trusted = {  # outputs of calls batched beyond question, batch in place bd
                e.node
                for call in sure
                if not (call.rule is not None and call.rule.raw_layout)
                for e in call.edges
            }
            for call in questioned:
                confirm_batch(
                    call,
                    whole(),
                    batched,
                    losses.grad_fn,
                    n,
                    bd,
                    call.questioned,
                    trusted=trusted,
                )
        shared = [call for call in calls if call.shared is not None]
        meets = None
        if shared and n > 1:  # before the backward, which frees what a meet saved
            meets = _shared.plan_or_absorb(
                shared, consumers, whole, calls, regions, n, bd, losses.grad_fn
            )
        for call in calls:  # before the backward, which frees what the nodes saved
            rule = call.rule
            if call.shared is not None:
                continue  # its edges lie behind the meets, where the backward does not go
            if rule is None and call.absorbed:
                call.rerun_because = call.absorbed
                warnings.warn(  # one place: each message shown once a process
                    f"{call.label} is re-run for each example: {call.absorbed}, so it takes "
                    "that layer's parameters: correct, but slow. Calling the layer on inputs "
                    "with the batch dimension, or freezing it, avoids the re-run.",
                    stacklevel=1,
                )
                check_exits(call, regions[call], whole())
                continue
            if rule is None:
                call.direct = _direct.plan(call, uses[call], n, bd, calls)
                call.inner = [use.edge for use in call.direct or ()]
                if call.direct is None:  # re-run with its outputs' gradients alone
                    check_exits(call, regions[call], whole())
                if call.direct is None and call.rerun_param in call.adopted:
                    warnings.warn(  # one place: each message shown once a process
                        f"{call.label} uses {list(call.adopted)} of modules inside it "
                        "directly, not by calling those modules, so it is re-run for each "
                        f"example to take their gradients ({call.rerun_because}): correct, "
                        "but slow. Calling the modules lets their rules take the gradients.",
                        stacklevel=1,
                    )
                continue
            if rule.saved is not None:
                call.saved = rule.saved(call.edges[0].node)
            if rule.inner is not None:
                found = rule.inner(call.module, call.edges[0].node, call.boundary)
                if found is not None:
                    call.inner_value, call.inner = found.value, list(found.edges)
        own = [call for call in calls if call.shared is None or meets is None]
        edges = [e for call in own for e in (*call.edges, *call.inner)]
        cuts = []
        if meets is not None:
            _shared.check_edges(meets, own)
            edges += [meet.use.edge for meet in meets.meets]
        elif any(call.rule is not None and call.rule.split is not None for call in own):
            spans, pos = [], 0  # each call's edges in ``edges``
            for call in own:
                spans.append(range(pos, pos + len(call.edges) + len(call.inner)))
                pos = spans[-1].stop
            cuts = _split.plan(
                losses.grad_fn,
                own,
                spans,
                edges,
                lambda call: rule_inputs(self, call, n),
                self._positional,
            )
        checked = None
        if n > 1 and self.verify != "never":
            key = (n, bd, several, self._only, losses.shape, *[c.sig for c in calls])
            if _verify.due(self.model, key, self.verify):
                checked = self._weighted(losses, own, edges, n, bd, key)
        outs: tuple[Tensor | None, ...]
        if cuts:
            split_at = functools.partial(self._split_at, n=n)
            outs = tuple(_split.backward(losses, edges, cuts, split_at))
        else:
            outs = _output_grads(losses, edges)
        pos = 0
        for call in own:
            end = pos + len(call.edges)
            call.grad_outputs, call.inner_grads = outs[pos:end], outs[end : end + len(call.inner)]
            pos = end + len(call.inner)
            if call.views:  # read at the base of an output rebuilt by an in-place op
                call.grad_outputs = tuple(
                    call.views[k].of(g) if k in call.views and g is not None else g
                    for k, g in enumerate(call.grad_outputs)
                )
        if checked is not None:
            self._compare(outs, *checked)
        if meets is not None:
            _shared.output_grads(shared, meets, outs[pos:], n, bd)
        elif shared:  # one example: the output's gradient is its own
            _shared.one_example(shared, bd)
        reached = []
        for call in calls:
            if all(g is None for g in call.grad_outputs):
                continue
            for g in call.grad_outputs:
                if call.rule is not None and call.rule.raw_layout:
                    break  # the rule checks its own layout
                if g is not None and not has_batch(g, n, bd):
                    raise RuntimeError(
                        f"the losses have {n} rows, but {call.label} produced an output of "
                        f"shape {tuple(g.shape)} whose batch dimension {bd} does not have "
                        f"{n} examples. Pass one loss per example, shape (n,) or (n, ...) "
                        "(not flattened token losses); pass capture(model, batch_dim=...) "
                        "for sequence-first models. Layers called on tensors without the batch "
                        "dimension are followed to where they meet the batch only inside a call "
                        "of the captured model itself (not of one of its submodules)."
                    )
            reached.append(call)
        return PerExample(self, reached, n)

    def _weighted(
        self,
        losses: Tensor,
        own: list[_Call],
        edges: list[GradientEdge],
        n: int,
        bd: int,
        key: tuple[Any, ...],
    ) -> tuple[
        Tensor,
        bool,
        list[tuple[int, _Call, str, int, View | None]],
        tuple[Tensor | None, ...],
        _verify.Pending,
    ]:
        """The first half of ``_verify``'s output-gradient check, before the backward: the
        gradients at the calls' outputs (and at the ops that use the parameters of calls
        without a rule) of the losses weighted by random ``w``. Each checked edge: its
        index in ``edges``, its call, what it is, and where it has the batch."""
        checked: list[tuple[int, _Call, str, int, View | None]] = []
        pos = 0
        for call in own:  # its edges in ``edges``: its outputs', then its inner ones
            _, ats = _batch_dims(call, None, bd)
            for k, at in enumerate(ats):
                if at is not None:  # (an output rebuilt by an in-place op: at its base)
                    what = "its output" if k == 0 else f"its output {k}"
                    checked.append((pos + k, call, what, at, call.views.get(k)))
            pos += len(call.edges)
            for j, use in enumerate(call.direct or ()):  # its inner edges are these uses'
                what = f"the op that uses its {use.local!r}"
                checked.append((pos + j, call, what, use.batch, None))
            pos += len(call.inner)
        metadata = [edges[i].node._input_metadata[edges[i].output_nr] for i, *_ in checked]
        half = losses.dtype == torch.float16 or any(m.dtype == torch.float16 for m in metadata)
        w = _verify.weights(n, losses.device, half)  # (n,)
        weighted: tuple[Tensor | None, ...] = ()
        if checked:
            weighted = _verify.weighted_grads(losses, w, [edges[i] for i, *_ in checked])
        rerun = [c for c in own if c.rule is None and c.direct is None and c.shared is None]
        pending = _verify.Pending(self.model, key, rerun)
        for call in rerun:  # checked where their gradients are taken (rules/generic.py)
            call.verify = pending
        return w, half, checked, weighted, pending

    def _compare(
        self,
        outs: tuple[Tensor | None, ...],
        w: Tensor,
        half: bool,
        checked: list[tuple[int, _Call, str, int, View | None]],
        weighted: tuple[Tensor | None, ...],
        pending: _verify.Pending,
    ) -> None:
        """The second half: raise where a row of a checked edge's gradient is not ``w_i``
        times the plain backward's, so not example ``i``'s alone."""
        n = w.shape[0]
        low = any(g is not None and g.dtype in (torch.float16, torch.bfloat16) for g in outs)
        compared = True  # every row that could be compared was
        for (i, call, what, at, view), gw in zip(checked, weighted, strict=True):
            g = outs[i]
            if g is None or gw is None:
                continue
            if view is not None:
                g, gw = view.of(g), view.of(gw)
            if not has_batch(g, n, at) or gw.shape != g.shape:
                continue
            over = _verify.scaled_apart(g, gw, w, at, low, _verify.reduced(g.device), half)
            if over > 1:
                raise _verify.not_examples(call.label, what, at, n, over)
            compared = compared and over == over  # nan: a row overflowed in one backward
        for call in pending.calls:  # the losses do not reach it: it is not re-run
            if all(g is None for g in call.grad_outputs):
                pending.passed(call)
        if compared:  # (not: the pattern is checked again at its next step)
            pending.passed(None)  # the step's pattern is checked, but for the re-runs'

    def grads(self, losses: Tensor) -> dict[str, Tensor]:
        """Per-example gradients ``{name: (n, *param.shape)}`` of every trainable parameter
        (zeros for parameters the losses do not depend on). Example i's entry is
        ``∇θ losses[i].sum()``, with no 1/n factor."""
        return self.backward(losses).grads()

    def norms(self, losses: Tensor) -> Tensor:
        """Per-example gradient norms ``(n,)`` over all captured parameters, computed
        without materialising per-example gradients where the layer's rule allows."""
        return self.backward(losses).norms()

    def clip_(self, losses: Tensor, max_norm: float) -> Tensor:
        """Add ``Σ_i min(1, max_norm / ‖g_i‖) · g_i`` into each trainable ``p.grad``
        (creating it if ``None``), like ``.backward()`` accumulates. Returns the pre-clip
        norms ``(n,)``."""
        return self.backward(losses)._clip(max_norm, release=True)

    def _split_at(self, cut: _split.Cut, grads: Sequence[Tensor | None], n: int) -> Tensor | None:
        """Run a cut's rule (``Rule.split``) once its edges' gradients are known: keep its
        ``prepare`` result for the call, return the gradient at its input."""
        call = cut.call
        if all(g is None for g in grads):
            return None  # the losses do not reach the call, nor what is below it
        k = len(call.edges)
        call.grad_outputs, call.inner_grads = tuple(grads[:k]), tuple(grads[k:])
        rule = call.rule
        value, grad = rule.split.run(call.module, rule_inputs(self, call, n), rule_G(self, call, n))
        call.prepared = Prepared(value)
        return grad

    # -- helpers used by PerExample -----------------------------------------------------

    def _positional(self, call: _Call) -> tuple[Any, ...]:
        """The call's arguments as one positional tuple (keywords bound into place)."""
        if not call.kwargs:
            return call.args
        sig = _signature(type(call.module))
        bound = sig.bind(*call.args, **call.kwargs)
        bound.apply_defaults()
        return tuple(bound.arguments.values())


class _GlobalHook:
    """A global forward hook with keyword arguments that runs before every other forward
    hook, removed without a trace.

    Global hooks run in the order of their table, before each module's own. A program's
    global hook registered before this one and returning an output in a module's place
    would otherwise run first, and the gradient would be read at its output, not at the
    module's. So this one goes to the table's front.

    The handle ``register_module_forward_hook`` returns leaves the hook's entry in
    ``torch.nn.modules.module._global_forward_hooks_with_kwargs`` when removed (torch
    2.13 and 2.14): one entry a step, forever, and a module table torch's own code
    checks for global hooks (``_has_any_global_hook``). This removes it too."""

    def __init__(self, hook: Any) -> None:
        self._handle = register_module_forward_hook(hook, with_kwargs=True)
        hooks = torch.nn.modules.module._global_forward_hooks
        if len(hooks) > 1:  # reordered in place (torch's own code reads this table)
            mine = hooks.pop(self._handle.id)
            others = dict(hooks)
            hooks.clear()
            hooks[self._handle.id] = mine
            hooks.update(others)

    def remove(self) -> None:
        self._handle.remove()
        with_kwargs = getattr(torch.nn.modules.module, "_global_forward_hooks_with_kwargs", {})
        with_kwargs.pop(self._handle.id, None)


def _output_grads(losses: Tensor, edges: list[GradientEdge]) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad(losses.sum(), edges, allow_unused=True)``, handed to autograd's
    engine the way that function hands it (``_engine_run_backward``, the sum's seed a one
    as it makes it), without its Python checks of arguments that are right by construction
    here: about 50 µs a step on a CPU, a share of a small model's step. The sum stays the
    backward's root, so hooks on the losses (``register_multi_grad_hook``, PyTorch's module
    trackers) see what they see in ``.backward()``. Falls back to that function where torch
    lacks the engine's, for tensor subclasses (which it hands to their
    ``__torch_function__``) and where it would raise (losses without gradient, complex)."""
    run = getattr(torch.autograd.graph, "_engine_run_backward", None)
    total = losses.sum()  # ()
    if run is None or type(total) is not Tensor or not total.requires_grad or total.is_complex():
        return torch.autograd.grad(total, edges, allow_unused=True)
    seed = torch.ones_like(total, memory_format=torch.preserve_format)  # () as autograd's
    return run((total,), (seed,), False, False, tuple(edges), True, False)


def _rows(edge: GradientEdge, bd: int) -> int | None:
    """The size of dimension ``bd`` of the tensor at ``edge`` (None: it has no such)."""
    shape = edge.node._input_metadata[edge.output_nr].shape
    return shape[bd] if len(shape) > bd else None


def _detach(t: Any) -> Any:
    return t.detach() if isinstance(t, Tensor) else t


def _kept(output: Any) -> tuple[Any, list[tuple[Tensor, int]]]:
    """A call's output for its rule (``Rule.output``): detached, with each tensor's
    version counter at call time (shared with the output's), to see an in-place change."""
    kept = tree_map(_detach, output)
    return kept, [(t, t._version) for t in tree_flatten(kept)[0] if isinstance(t, Tensor)]


def _edge(t: Tensor) -> GradientEdge:
    """``get_gradient_edge(t)`` for a tensor that requires grad, built straight from its
    ``grad_fn`` where that is a C++ node: the common case, at a third of the cost (a
    custom ``autograd.Function``'s node, or a leaf's accumulator, goes through
    ``get_gradient_edge``, which keeps the former's graph alive)."""
    fn = t.grad_fn
    if fn is None or isinstance(fn, torch._C._FunctionBase):
        return get_gradient_edge(t)
    return GradientEdge(fn, t.output_nr)


def _bases(leaves: Sequence[Any], edge_index: Sequence[int]) -> list[Any] | None:
    """For each output with an edge that views a whole contiguous tensor, each element
    once (a Linear's output on 3-d inputs: ``addmm`` viewed back; sequence-first
    attention's transposed for ``batch_first``), that tensor's node and output number and
    the view's shape, strides and offset, as ``_graph._rebased`` takes them; None where no
    output does. Run for every call: a few µs, and edges and views only where needed."""
    found: list[Any] | None = None
    for k, i in enumerate(edge_index):
        t = leaves[i]
        if not t._is_view():
            continue
        base = t._base
        if base is None or base.numel() != t.numel() or not base.is_contiguous():
            continue
        fn = base.grad_fn
        if (
            fn is None
            or isinstance(fn, torch._C._FunctionBase)
            or not (t.is_contiguous() or _dense(t))
        ):
            continue
        found = found or [None] * len(edge_index)
        if t.is_contiguous():  # the same elements in the same order: a reshape
            found[k] = (fn, base.output_nr, t.shape, None, 0)
        else:
            offset = t.storage_offset() - base.storage_offset()
            found[k] = (fn, base.output_nr, t.shape, t.stride(), offset)
    return found


def _dense(t: Tensor) -> bool:
    """``t``'s elements are a block of memory, each once, in some order of its dimensions."""
    step = 1
    dims = sorted((st, s) for s, st in zip(t.shape, t.stride(), strict=True) if s != 1)
    for stride, size in dims:  # innermost first
        if stride != step:
            return False
        step *= size
    return True


def _trainable(
    modules: list[tuple[str, nn.Module]], only: frozenset[str] | None
) -> tuple[dict[str, nn.Parameter], dict[int, str]]:
    """The captured parameters by name, in ``named_parameters()`` order, and their names
    by ``id``: what ``named_parameters()`` gives, from the walk of the modules already made
    (each parameter under its first name)."""
    params: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for prefix, module in modules:
        for local, p in module._parameters.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            name = f"{prefix}.{local}" if prefix else local
            if p.requires_grad and (only is None or name in only):
                params[name] = p
    return params, {id(p): n for n, p in params.items()}


def _own_params(module: nn.Module, whole: bool, trainable: dict[int, str]) -> dict[str, Any]:
    """The captured parameters a call of ``module`` owns: its own (as ``named_parameters``
    without recursion gives them, read straight from the module's dict, which is cheaper
    on every step), or all of its subtree's when its rule covers the subtree."""
    if whole:
        return {n: p for n, p in module.named_parameters() if id(p) in trainable}
    own: dict[str, Any] = {}
    seen: set[int] = set()
    for n, p in module._parameters.items():
        if p is not None and id(p) in trainable and id(p) not in seen:  # first name wins
            seen.add(id(p))
            own[n] = p
    for locals_ in _reparam.parametrized(module).values():  # a parametrized weight's
        for local in locals_:
            p = module.get_parameter(local)
            if id(p) in trainable and id(p) not in seen:
                seen.add(id(p))
                own[local] = p
    return own


_TENSOR_SPEC = tree_flatten(torch.empty(0))[1]
# a single tensor output's edge index and leaves: shared, as every call makes objects for
# the garbage collector to count, and it runs when they add up
_FIRST, _NO_LEAF = (0,), (None,)
_SIGNATURES: dict[type, inspect.Signature] = {}


def _slots(module: nn.Module, own: dict[str, Any]) -> tuple[_Slot, ...]:
    """Where each of a module's captured parameters sits: ``(the _parameters dict of the
    module holding it, its key there, the parameter)``, to see it replaced at a call."""
    slots = []
    for local, p in own.items():
        prefix, _, key = local.rpartition(".")
        holder = module.get_submodule(prefix) if prefix else module
        slots.append((holder._parameters, key, p))
    return tuple(slots)


def _label(module: nn.Module, name: str) -> str:
    """A module as messages name it: its class and its name in the model."""
    return f"{type(module).__name__} {name or '<model>'!r}"


def _refuse_batch_made(module: nn.Module, name: str, output: Tensor | None) -> None:
    shape = f" {tuple(output.shape)}" if output is not None else ""
    raise RuntimeError(
        f"{_label(module, name)} made an output{shape} whose "
        "batch dimension has the batch's number of entries although none of its tensor "
        "inputs has them there: a layer that moves the batch from another dimension (a "
        "transpose of a sequence-first input inside it), a dimension of another kind that "
        "has as many entries by chance (the classes of a pooled head (n, C) in a model "
        "captured with batch_dim=1), or a layer that makes the batch itself, whose rows "
        "are no example's own input. Call the layer on inputs with the batch in the batch "
        "dimension (for a pooled head of a sequence-first model, pool with keepdim=True, "
        "e.g. h.mean(0, keepdim=True))."
    )


def _refuse_replaced(module: nn.Module, name: str, key: str) -> None:
    raise RuntimeError(
        f"{_label(module, name)} is called with a parameter "
        f"{key!r} other than the one it had when the capture was entered: replaced for "
        "the call (torch.func.functional_call, torch.nn.utils.stateless) or reassigned "
        "inside the block. Its rule would take the gradient of the tensor it was called "
        "with and report it as the module's own parameter's. Replace parameters before "
        "entering the capture; for gradients of tensors passed to functional_call, use "
        "torch.func."
    )


def _signature(cls: type) -> inspect.Signature:
    sig = _SIGNATURES.get(cls)
    if sig is None:
        forward = cls.forward  # type: ignore[attr-defined]
        params = list(inspect.signature(forward).parameters.values())[1:]  # drop self
        sig = _SIGNATURES[cls] = inspect.Signature(params)
    return sig


def _select(model: nn.Module, params: Iterable[str | nn.Parameter]) -> set[str]:
    named = dict(model.named_parameters())
    by_id = {id(p): n for n, p in named.items()}
    chosen = set()
    for p in params:
        name = p if isinstance(p, str) else by_id.get(id(p))
        if name is None or name not in named:
            raise ValueError(
                f"params: {p if isinstance(p, str) else 'a tensor'} is not a "
                "parameter of the model (see model.named_parameters())"
            )
        if not named[name].requires_grad:
            raise ValueError(f"params: {name!r} is frozen (requires_grad=False)")
        chosen.add(name)
    return chosen


def _refuse_hook_reparametrization(name: str, module: nn.Module) -> None:
    """The deprecated ``torch.nn.utils.weight_norm`` and ``spectral_norm`` compute the
    weight in a forward pre-hook, outside what a call's rule sees."""
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm | SpectralNorm):
            kind = "weight_norm" if isinstance(hook, WeightNorm) else "spectral_norm"
            raise RuntimeError(
                f"{type(module).__name__} {name!r} uses torch.nn.utils.{kind}, which "
                "computes its weight in a forward pre-hook that indigrad cannot follow. Use "
                f"torch.nn.utils.parametrizations.{kind}, which indigrad supports."
            )


def _one_entry(t: Any, bd: int) -> bool:
    """``t`` is a tensor with one entry in the batch dimension ``bd``."""
    return isinstance(t, Tensor) and t.dim() > bd and t.shape[bd] == 1


def _expand(t: Tensor, n: int, bd: int) -> Tensor:
    """``t`` without a batch dimension (or with one of size 1) broadcast to ``n`` examples."""
    if t.dim() > bd and t.shape[bd] == 1:
        return t.expand(*t.shape[:bd], n, *t.shape[bd + 1 :])
    if t.dim() >= bd:
        t = t.unsqueeze(bd)
        return t.expand(*t.shape[:bd], n, *t.shape[bd + 1 :])
    return t


def _check_losses(losses: Any) -> Tensor:
    if not isinstance(losses, Tensor):
        raise TypeError(f"losses must be a tensor of per-example losses, got {type(losses)}")
    if losses.dim() == 0:
        raise ValueError(
            "losses is a 0-d tensor, but indigrad needs one loss per example: compute it "
            'with reduction="none", e.g. F.cross_entropy(out, y, reduction="none")'
        )
    return losses
