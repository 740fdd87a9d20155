"""Per-example quantities from one backward: gradients, norms and the clipped sum.

Each recorded module call contributes, through its rule, per-example gradients of its
own parameters. A parameter used by several calls (a layer applied twice, weights tied
across modules) gets the per-example *sum* of its uses; since ``‖g¹ + g²‖² ≠ ‖g¹‖² +
‖g²‖²``, its squared norm takes the cross terms of its uses' Grams (``rules/tied.py``),
or else comes from the materialised sum. A parameter used by one call takes its rule's
fast ``sq_norms`` when the rule has one.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Container
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_unflatten

from . import _reparam, _stack
from ._batch import has_batch
from ._host import gc_paused
from ._joint import Joint
from ._precision import _exact, _param_dtype, _upcast
from .rules import Rule, _cost, tied
from .rules import direct as _direct
from .rules.generic import generic_grads
from .rules.registry import Output, Prepared, Taken

if TYPE_CHECKING:
    from .capture import _Call, capture


def rule_inputs(cap: capture, call: _Call, n: int) -> tuple[Any, ...]:
    """The ``inputs`` a call's rule takes: its positional arguments, batch first (unless
    the rule has a raw layout) in the parameters' precision, then what the rule's
    ``saved`` and ``inner`` took from the graph, then the call's output where the rule
    asks for it (and nothing has changed it in place since)."""
    rule = call.rule
    assert rule is not None
    bd = 0 if rule.raw_layout else cap.batch_dim  # raw: nothing is moved
    dtype = _param_dtype(call)
    inputs = tuple(_upcast(_batch_first(t, n, bd), dtype) for t in cap._positional(call))
    if rule.saved is not None:
        saved = call.saved  # in the forward's layout, like the arguments
        if bd and isinstance(saved, tuple):
            saved = tuple(_batch_first(t, n, bd) for t in saved)
        inputs += (saved,)
    if rule.inner is not None and call.inner_value is not None:
        inputs += (Taken(call.inner_value, call.inner_grads),)
    if rule.output and call.output is not None:
        value, versions = call.output
        if all(t._version == version for t, version in versions):  # not changed in place
            inputs += (Output(value),)
    return inputs


def rule_G(cap: capture, call: _Call, n: int) -> Any:
    """The ``G`` a call's rule takes: its output gradients laid out as :func:`rule_inputs`,
    in the output's structure (None where none arrived)."""
    rule = call.rule
    assert rule is not None
    bd = 0 if rule.raw_layout else cap.batch_dim
    dtype = _param_dtype(call)
    leaves = list(call.out_leaves)
    for i, g in zip(call.edge_index, call.grad_outputs, strict=True):
        leaves[i] = None if g is None else _upcast(_batch_first(g, n, bd), dtype)
    spec = call.out_spec
    return leaves[0] if spec.is_leaf() else tree_unflatten(leaves, spec)


class _Entry:
    """A recorded call, its rule, and the rule's inputs in batch-first layout."""

    def __init__(self, cap: capture, call: _Call, n: int) -> None:
        self.cap = cap
        self.call = call
        self.n = n
        self.rule: Rule | None = call.rule
        self._grads: dict[str, Tensor] | None = None
        self._prepared: Any = None  # the rule's ``prepare`` result, once asked for
        # parametrized tensors (weight_norm, …): the rule's gradients of the tensor go to
        # its originals by the chain rule, from materialised gradients
        rule = self.rule
        self.reparam = {} if rule is None else _reparam.parametrized(call.module, rule.subtree)
        if self.rule is not None:
            self.inputs = rule_inputs(cap, call, n)
            self.G: Any = rule_G(cap, call, n)
            self._prepared = call.prepared  # where the backward was split at the call

    def _own(self, values: dict[str, Tensor], what: str) -> dict[str, Tensor]:
        """The rule's results for the call's trainable parameters, shape-checked: a rule
        that finds the wrong number of examples must not broadcast silently."""
        params, n = self.call.params, self.n
        own = {}
        for k, p in params.items():
            v = values.get(k)
            if v is None:
                missing = sorted(set(params) - set(values))
                label = self.call.label
                raise RuntimeError(f"the rule for {label} returned no {what} for {missing}")
            shape = v.shape  # compared without building the expected shape: run per call
            if what == "weighted_sum":
                right = shape == p.shape
            elif what == "sq_norms":
                right = len(shape) == 1 and shape[0] == n
            else:  # grads
                right = len(shape) == p.dim() + 1 and shape[0] == n and shape[1:] == p.shape
            if not right:
                expected = {"grads": (n, *p.shape), "sq_norms": (n,)}.get(what, tuple(p.shape))
                raise RuntimeError(
                    f"the rule for {self.call.label} returned {what}[{k!r}] of shape "
                    f"{tuple(shape)}, expected {expected} for {n} examples"
                )
            own[k] = v
        return own

    def grads(self) -> dict[str, Tensor]:
        if self._grads is None:
            if self.n == 0:  # an empty batch (Poisson sampling): no rule needs to run
                params = self.call.params.items()
                self._grads = {k: p.new_zeros((0, *p.shape)) for k, p in params}
            elif self.rule is None and self.call.direct is not None:
                self._grads = _direct.grads(self.call, self.n)
            elif self.rule is None:
                with self.cap._pause():
                    self._grads = generic_grads(self.call, self.n, self.cap.batch_dim)
            else:
                module, rule_grads = self.call.module, self.rule.grads
                if self.reparam:
                    values = _reparam.grads(
                        rule_grads, module, self.inputs, self._g(), self.reparam
                    )
                else:
                    values = rule_grads(module, self.inputs, self._g())
                self._grads = self._own(values, "grads")
        return self._grads

    def _fast(self, clipping: bool) -> bool:
        """Whether to use the rule's fast paths rather than materialise the gradients."""
        rule = self.rule
        if self._grads is not None or rule is None or rule.sq_norms is None or self.n == 0:
            return False
        if self.reparam:
            return False  # the rule's norms are the computed tensor's
        if clipping and rule.weighted_sum is None:
            return False  # the gradients are needed anyway; take the norms from them
        choose = rule.materialise
        return choose is None or not choose(self.call.module, self.inputs, self.G, clipping)

    def sq_norms(
        self,
        clipping: bool = False,
        take: Callable[[str, Tensor], bool] | None = None,
        fast: bool | None = None,
    ) -> dict[str, Tensor]:
        """The squared norms of the call's parameters. Materialised gradients that
        ``take(local_name, g)`` accepts (for a :class:`Joint`) are left out. ``fast``:
        the cost choice of :meth:`_fast`, where it was made already (it spends a budget)."""
        if self._fast(clipping) if fast is None else fast:
            assert self.rule is not None and self.rule.sq_norms is not None
            sq = self.rule.sq_norms(self.call.module, self.inputs, self._g())
            return self._own(sq, "sq_norms")
        if self._direct_lookups():  # tables looked up in a module's own forward
            out = _direct.lookup_sq_norms(self.call)
            rest = _direct.grads(self.call, self.n, [k for k in self.call.params if k not in out])
            out.update((k, _sq_norm(g)) for k, g in rest.items() if take is None or not take(k, g))
            return out
        grads = self.grads().items()
        return {k: _sq_norm(g) for k, g in grads if take is None or not take(k, g)}

    def _direct_lookups(self) -> bool:
        """Whether the call's parameters are read from the graph with embedding lookups
        among their uses, whose norms and sums the ``nn.Embedding`` rule gives."""
        direct = self.call.direct
        return (
            self.rule is None
            and self._grads is None
            and self.n > 0
            and direct is not None
            and any(use.lookup is not None for use in direct)
        )

    def weighted_sum(self, coef: Tensor, skip: Container[str] = ()) -> dict[str, Tensor]:
        """``Σ_i coef_i g_i`` of the call's parameters, but for materialised ones in
        ``skip`` (their sums come from a :class:`Joint`)."""
        if skip and all(k in skip for k in self.call.params):
            return {}  # all from the joint (the call may have let go of its tensors)
        fast = self.rule is not None and self.rule.weighted_sum is not None and not self.reparam
        if self._grads is None and fast and self.n > 0:
            assert self.rule is not None and self.rule.weighted_sum is not None
            return self._own(
                self.rule.weighted_sum(self.call.module, self.inputs, self._g(), coef),
                "weighted_sum",
            )
        if self._direct_lookups():
            out = _direct.lookup_weighted_sums(self.call, coef)
            rest = [k for k in self.call.params if k not in out and k not in skip]
            out.update(
                (k, _contract(coef, g)) for k, g in _direct.grads(self.call, self.n, rest).items()
            )
            return out
        return {k: _contract(coef, g) for k, g in self.grads().items() if k not in skip}

    def _g(self) -> Any:
        """What the rule's functions take as ``G``: the rule's ``prepare`` result, computed
        once for the call, where it has one."""
        rule = self.rule
        if rule is None or rule.prepare is None:
            return self.G
        if self._prepared is None:
            self._prepared = Prepared(rule.prepare(self.call.module, self.inputs, self.G))
        return self._prepared

    def held(self) -> int:
        """Floating-point elements this call still holds: its inputs and output gradients
        (while not released) and its materialised gradients."""
        tensors = [*getattr(self, "inputs", ()), *self.call.grad_outputs, *self.call.inner_grads]
        if self._grads is not None:
            tensors.extend(self._grads.values())
        return sum(t.numel() for t in tensors if isinstance(t, Tensor) and t.is_floating_point())

    def release(self, keep_grads: bool = False) -> None:
        """Drop what this call holds (inputs, output gradients and, unless ``keep_grads``,
        materialised gradients) once it is no longer needed."""
        if not keep_grads:
            self._grads = None
        self.inputs, self.G, self._prepared = (), None, None
        call = self.call
        call.args, call.kwargs, call.grad_outputs, call.versions = (), {}, (), []
        call.saved, call.direct, call.inner_value, call.prepared = None, None, None, None
        call.output = None
        call.inner, call.inner_grads = [], ()


class PerExample:
    """The per-example view of one backward; returned by :meth:`capture.backward`.

    Every method reuses the same backward; results are computed on first use.

    Example:
        >>> import torch, indigrad
        >>> model = torch.nn.Linear(3, 2)
        >>> x = torch.randn(5, 3)
        >>> with indigrad.capture(model) as cap:
        ...     per_example = cap.backward(model(x).square().sum(1))
        ...     grads, norms = per_example.grads(), per_example.norms()
        >>> grads["weight"].shape, norms.shape
        (torch.Size([5, 2, 3]), torch.Size([5]))
        >>> flat = torch.cat([g.flatten(1) for g in grads.values()], 1)   # (n, P)
        >>> torch.allclose(flat.norm(dim=1), norms)
        True
    """

    def __init__(self, cap: capture, calls: list[_Call], n: int) -> None:
        self.n = n
        self._params: dict[str, nn.Parameter] = cap._params
        self._entries = [_Entry(cap, call, n) for call in calls]
        self._uses: dict[str, list[tuple[_Entry, str]]] = {}
        for entry in self._entries:
            for local, p in entry.call.params.items():
                self._uses.setdefault(cap._names[id(p)], []).append((entry, local))
        self._names = cap._names
        self._grads: dict[str, Tensor] | None = None
        self._sq_norms: dict[str, Tensor] | None = None
        self._total: Tensor | None = None  # (n,) squared norms over all parameters
        self._joint: Joint | None = None  # the small gradients taken into that total
        # same-shaped calls taken together, by id of each: for the norms, for the sums
        self._stacks: dict[int, _stack._Stacked] = {}
        self._sum_stacks: dict[int, _stack._Stacked] = {}
        self._group = cap._process_group

    @gc_paused
    @_exact
    def grads(self) -> dict[str, Tensor]:
        """``{name: (n, *param.shape)}`` for every captured parameter, in
        ``named_parameters()`` order; zeros for parameters the losses do not reach."""
        if self._grads is None:
            self._grads = {name: self._grad(name) for name in self._params}
        return self._grads

    def _grad(self, name: str) -> Tensor:
        """One parameter's per-example gradients: the sum over its uses."""
        if self._grads is not None:
            return self._grads[name]
        uses = self._uses.get(name)
        if not uses:
            p = self._params[name]
            return p.new_zeros((self.n, *p.shape))
        return _sum(entry.grads()[local] for entry, local in uses)

    def sq_norms(self) -> dict[str, Tensor]:
        """``{name: (n,)}``: each parameter's per-example squared gradient norm."""
        return self._sq(clipping=False)

    @gc_paused
    @_exact
    def _sq(
        self, clipping: bool, release: bool = False, joint: Joint | None = None
    ) -> dict[str, Tensor]:
        """Each parameter's squared norms. With ``release`` (a clipped sum, nothing asked
        later), a call whose gradients were materialised drops its inputs and output
        gradient at once: its sum comes from the gradients, and the peak memory is
        lower. With ``joint``, small materialised gradients go into it instead of the
        result (which then lacks their names) and nothing is cached."""
        if self._sq_norms is not None:
            return self._sq_norms
        out: dict[str, Tensor] = {}
        per_call: dict[int, dict[str, Tensor]] = {}
        budget = self._memory_budget() if clipping else contextlib.nullcontext()
        with budget:
            self._sq_each(out, per_call, clipping, release, joint)
        if release:
            for entry in self._entries:
                if entry._grads is not None:
                    entry.release(keep_grads=True)
        if joint is None:
            self._sq_norms = out
        return out

    def _memory_budget(self) -> contextlib.AbstractContextManager[None]:
        """The budget for kept per-example gradients of :mod:`.rules._cost`, from the
        floating-point elements per example of all calls' inputs and output gradients."""
        ruled = [entry for entry in self._entries if entry.rule is not None]
        if not ruled or self.n == 0 or not self._params:
            return contextlib.nullcontext()
        device = next(iter(self._params.values())).device
        return _cost.memory_budget(sum(entry.held() for entry in ruled) // self.n, device)

    def _sq_each(
        self,
        out: dict[str, Tensor],
        per_call: dict[int, dict[str, Tensor]],
        clipping: bool,
        release: bool,
        joint: Joint | None,
    ) -> None:
        """Each parameter's squared norms into ``out``, or its gradient into ``joint``,
        one rule call per recorded call (``per_call``), or one per stack of calls taken
        together (:mod:`._stack`); see :meth:`_sq`."""
        fast = self._choose(clipping)
        stacks = _stack.plan([e for e in self._entries if self._stackable(e, fast)])
        self._stacks, self._sum_stacks = stacks.norms, stacks.sums
        if joint is not None and self._grads is None and _stack.JOINT:
            self._join_stacked(joint, per_call, fast, release)
        for name, p in self._params.items():
            uses = self._uses.get(name, [])
            if len(uses) > 1 and self._grads is None:
                sq = self._tied_sq(name, uses)
                if sq is not None:
                    out[name] = sq
                    continue
            if self._grads is not None or len(uses) > 1:
                g = self._grad(name)  # one parameter's: the others may keep their fast paths
                if joint is None or not joint.take(name, g):
                    out[name] = _sq_norm(g)
            elif uses:
                entry, local = uses[0]
                if id(entry) not in per_call:
                    stacked = self._stacks.get(id(entry))
                    if stacked is not None:
                        per_call[id(entry)] = stacked.sq_norms(entry)
                    else:
                        take = self._taker(entry, joint)
                        chosen = fast[id(entry)] and entry._grads is None  # (a tied use's may be)
                        per_call[id(entry)] = entry.sq_norms(clipping, take, chosen)
                    if release and entry._grads is not None:
                        entry.release(keep_grads=True)
                sq = per_call[id(entry)].get(local)
                if sq is not None:  # else its gradient is in the joint
                    out[name] = sq
            else:
                out[name] = p.new_zeros(self.n)

    def _join_stacked(
        self,
        joint: Joint,
        per_call: dict[int, dict[str, Tensor]],
        fast: dict[int, bool],
        release: bool,
    ) -> None:
        """The small gradients of calls taken together (:class:`._stack.JointStack`: a
        stage's same-shaped GroupNorms on a GPU) into ``joint``, a block per parameter
        name, each call then with nothing left to take (``per_call``). All of a stack's
        blocks go in, or none (then its calls take their own, one by one)."""
        groups: dict[Any, list[_Entry]] = {}
        for entry in self._entries:
            js = _stack.JOINT.get(id(entry.rule))
            if js is None or entry._grads is not None or entry.reparam or entry.n == 0:
                continue
            if fast.get(id(entry), False) or not self._alone(entry):
                continue
            key = js.key(entry.call.module, entry.inputs, entry.G)
            if key is not None:
                groups.setdefault((id(entry.rule), tuple(entry.call.params), key), []).append(entry)
        # a stack copies its calls' inputs and output gradients side by side: at most
        # _stack._GROWTH times those of the largest call (what a conv's stack may make),
        # and its blocks are as large as the joint takes
        held = {id(e): e.held() for members in groups.values() for e in members}
        limit = _stack._GROWTH * max(held.values(), default=0)
        for (rule, locals_, _), members in groups.items():
            G = members[0].G
            widest = max(p.numel() for p in members[0].call.params.values())
            most = joint.room(G.dtype, G.device, len(G)) // max(len(G) * widest, 1)
            if most < 2:
                continue  # the joint takes no block of two: each call takes its own
            start = 0
            for length in _stack._fitting([held[id(e)] for e in members], limit):
                chunk, start = members[start : start + length], start + length
                for i in range(0, length, most):
                    part = chunk[i : i + most]
                    if len(part) > 1:
                        js = _stack.JOINT[rule]
                        self._join(js, part, set(locals_), joint, per_call, release)

    def _join(
        self,
        js: _stack.JointStack,
        members: list[_Entry],
        locals_: set[str],
        joint: Joint,
        per_call: dict[int, dict[str, Tensor]],
        release: bool,
    ) -> None:
        """One stack of :meth:`_join_stacked`: its blocks into ``joint``, or nothing."""
        modules, inputs = [e.call.module for e in members], [e.inputs for e in members]
        blocks = js.grads(modules, inputs, [e.G for e in members], locals_)
        if set(blocks) != locals_ or not all(joint.accepts(b) for b in blocks.values()):
            return  # the calls take their own (sized to fit, so only if a rule errs)
        for local, block in blocks.items():
            params = [e.call.params[local] for e in members]
            names = [self._names[id(p)] for p in params]
            joint.take_block(names, [p.shape for p in params], block)  # (n, k·P)
        for entry in members:
            per_call[id(entry)] = {}  # all in the joint
            if release:
                entry.release()

    def _alone(self, entry: _Entry) -> bool:
        """Every parameter of the call is used by that call alone."""
        return all(len(self._uses[self._names[id(p)]]) == 1 for p in entry.call.params.values())

    def _choose(self, clipping: bool) -> dict[int, bool]:
        """The cost choice (:meth:`_Entry._fast`) of each call whose norms
        :meth:`_sq_each` takes from its rule, made once and in the order it takes them
        (the choice spends a memory budget), by ``id``."""
        fast: dict[int, bool] = {}
        if self._grads is not None:
            return fast
        for name in self._params:
            uses = self._uses.get(name, [])
            if len(uses) == 1 and id(uses[0][0]) not in fast:
                entry = uses[0][0]
                fast[id(entry)] = entry._fast(clipping)
        return fast

    def _stackable(self, entry: _Entry, fast: dict[int, bool]) -> bool:
        """Whether a call may be taken together with others (:mod:`._stack`): it takes its
        rule's fast paths, and every one of its parameters is its own alone."""
        return fast.get(id(entry), False) and self._alone(entry)

    def _tied_sq(self, name: str, uses: list[tuple[_Entry, str]]) -> Tensor | None:
        """The squared norms of a parameter used by several calls, from the Grams of its
        uses (:mod:`.rules.tied`), or None where they do not apply or cost more."""
        if self.n == 0:
            return None
        factors = []
        for entry, local in uses:
            if entry._grads is not None or entry.reparam:
                return None
            if entry.rule is None:  # an embedding lookup read from the graph, or nothing
                f = _direct.lookup_factors(entry.call, local) if entry.call.direct else None
                if f is None:
                    return None
                factors.append(f)
                continue
            make = tied.FACTORS.get(entry.rule)
            if make is None:
                return None
            factors.append(make(entry.call.module, entry.inputs, entry.G, local))
        return tied.sq_norms(factors, self._params[name].numel())

    def _taker(self, entry: _Entry, joint: Joint | None) -> Callable[[str, Tensor], bool] | None:
        """What puts a call's materialised gradient into ``joint``: only that of a
        parameter used by this call alone (another's gradient is a sum over its uses)."""
        if joint is None:
            return None

        def take(local: str, g: Tensor) -> bool:
            name = self._names[id(entry.call.params[local])]
            return len(self._uses[name]) == 1 and joint.take(name, g)

        return take

    def norms(self) -> Tensor:
        """``(n,)``: ``‖∇θ losses[i]‖₂`` over all captured parameters together."""
        return self._norms(clipping=False)

    @gc_paused
    @_exact
    def _norms(self, clipping: bool, release: bool = False) -> Tensor:
        if not self._params:
            raise RuntimeError("the model has no trainable parameters")
        if self._total is None:
            if self._sq_norms is not None:  # asked for already, parameter by parameter
                sq = list(self._sq_norms.values())
            else:
                joint = self._joint = Joint()
                sq = list(self._sq(clipping, release, joint).values())
                if joint:
                    sq.append(joint.sq_norms())
            dtype = torch.float64 if any(s.dtype == torch.float64 for s in sq) else torch.float32
            self._total = torch.stack([_as(s, dtype) for s in sq]).sum(0)  # one sum, not P adds
        return self._total.sqrt()

    def clip_(self, max_norm: float) -> Tensor:
        """Add ``Σ_i min(1, max_norm / ‖g_i‖) · g_i`` into each captured ``p.grad``
        (creating it if ``None``). Returns the pre-clip norms ``(n,)``.

        Under ``DistributedDataParallel`` the clipped sums are all-reduced first, so that
        every rank adds ``(1/world_size) · Σ`` over all ranks' examples (DDP's averaging
        convention); the returned norms are this rank's."""
        return self._clip(max_norm, release=False)

    @gc_paused
    @_exact
    def _clip(self, max_norm: float, release: bool) -> Tensor:
        """:meth:`clip_`; with ``release``, each call's tensors are dropped as soon as its
        weighted sum is taken (for :meth:`capture.clip_`, where nothing else follows)."""
        if not (isinstance(max_norm, int | float) and math.isfinite(max_norm) and max_norm > 0):
            raise ValueError(f"max_norm must be a positive finite number, got {max_norm!r}")
        for name, p in self._params.items():
            if p.grad is not None and p.grad.layout != torch.strided:
                raise ValueError(
                    f"{name!r} has a {p.grad.layout} .grad (an Embedding with sparse=True?): "
                    "clip_ adds a dense clipped sum, which cannot go into it. Use "
                    "sparse=False, or set .grad to None before the step."
                )
        norms = self._norms(clipping=True, release=release)
        coef = norms.reciprocal().mul_(max_norm).clamp_(max=1.0)  # (n,); a zero norm: 1
        joint = self._joint
        sums: dict[str, Tensor] = joint.weighted_sums(coef, last=release) if joint else {}
        in_joint = set(sums)
        shared = set()  # storages whose disjoint views are sums: each may be a .grad
        if sums:
            shared.add(next(iter(sums.values())).untyped_storage().data_ptr())
        entries = self._entries
        if release:
            self._grads = self._sq_norms = self._total = self._joint = None
            # calls that free more than their sums take go first, for a lower peak
            entries = sorted(entries, key=_net_growth)
        for entry in entries:
            params = entry.call.params
            skip = [k for k, p in params.items() if self._names[id(p)] in in_joint]
            stacked = self._sum_stacks.get(id(entry))
            if stacked is not None:
                own = stacked.weighted_sum(entry, coef)
                own = {k: v for k, v in own.items() if k not in skip}
                # disjoint views of buffers the stack made for its sums (Stack.weighted_sums)
                shared.update(v.untyped_storage().data_ptr() for v in own.values())
            else:
                own = entry.weighted_sum(coef, skip)
            for local, ws in own.items():
                name = self._names[id(params[local])]
                sums[name] = ws if name not in sums else sums[name] + ws
            if release:
                entry.release()
        if self._group is not None:
            sums, shared = _all_reduce_mean(sums, self._params, self._group)
        taken: set[int] = set()  # storages already made a .grad: never share one
        for name, p in self._params.items():
            total = sums.get(name)
            if total is None:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            elif p.grad is None:
                p.grad = _owned(_as(total, p.dtype), taken, shared)
            else:
                p.grad.add_(_as(total, p.grad.dtype))
        return norms


def _all_reduce_mean(
    sums: dict[str, Tensor], params: dict[str, nn.Parameter], group: Any
) -> tuple[dict[str, Tensor], set[int]]:
    """Average each parameter's clipped sum over the ranks, one all-reduce per dtype.
    Returns the averages (views of one buffer per dtype) and those buffers' storages."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    out = {}
    buffers = set()
    by_dtype: dict[torch.dtype, list[str]] = {}
    for name, p in params.items():
        by_dtype.setdefault(p.dtype, []).append(name)
    for dtype, names in by_dtype.items():
        parts = [
            sums[k].to(dtype).reshape(-1) if k in sums else params[k].new_zeros(params[k].numel())
            for k in names
        ]
        flat = torch.cat(parts)  # (Σ numel,)
        dist.all_reduce(flat, group=group)
        buffers.add(flat.untyped_storage().data_ptr())
        flat /= world
        for k, chunk in zip(names, flat.split([params[k].numel() for k in names]), strict=True):
            out[k] = chunk.view(params[k].shape)
    return out, buffers


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)  # skips the dispatch of a no-op .to


def _owned(t: Tensor, taken: set[int], shared: set[int]) -> Tensor:
    """``t`` as a ``.grad`` of its own. Sums are fresh tensors (rules return new ones), or
    disjoint views of one buffer made for them (``shared``: a joint sum, the all-reduced
    buffer), so only another view or a storage given to another parameter is copied,
    sparing a copy of every gradient."""
    ptr = t.untyped_storage().data_ptr()
    if ptr in shared:
        return t
    if t._base is not None or ptr in taken:
        return t.clone()
    taken.add(ptr)
    return t


def _batch_first(t: Any, n: int, bd: int) -> Any:
    if bd == 0 or not has_batch(t, n, bd):
        return t
    return t.movedim(bd, 0)


def _net_growth(entry: _Entry) -> int:
    """Elements a call's weighted sum allocates (its parameters) less those its release
    frees (what it holds)."""
    return sum(p.numel() for p in entry.call.params.values()) - entry.held()


def _contract(coef: Tensor, g: Tensor) -> Tensor:
    """``Σ_i coef_i g_i`` for ``g`` (n, *shape): one matrix-vector product."""
    P = math.prod(g.shape[1:])
    out = g.new_empty(g.shape[1:])  # (*shape,): not a view, so it becomes a .grad uncopied
    torch.mm(_as(coef, g.dtype)[None], g.reshape(g.shape[0], P), out=out.view(1, P))  # (1, P)
    return out


def _sq_norm(g: Tensor) -> Tensor:
    if g.dim() == 1:
        return g.square()  # (n,)
    return torch.linalg.vector_norm(g.flatten(1), dim=1).square()  # (n,), no (n, P) temporary


def _sum(values: Any) -> Tensor:
    it = iter(values)
    total = next(it)
    for v in it:
        total = total + v
    return total
