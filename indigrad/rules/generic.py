"""The generic rule: any module that owns trainable parameters and has no rule of its own.

For example i it computes the vector-Jacobian product of the module's own functional call
with that example's output gradient, with respect to the module's *direct* parameters
(children are handled by their own rules), vmapped over the batch:

    g_i = vjp(θ ↦ module(θ; x_i[None]), G_i[None])                   (n, *θ.shape)

Each example is run as a batch of one, so forwards that look at ``x.shape[0]`` work. A
tensor argument counts as batched when its batch dimension has the losses' ``n`` entries;
anything else (masks without a batch dimension, numbers, flags) is shared by all examples.
A call whose output all examples share (a position embedding of ``arange(T)``, called
without the batch) is run once as it was called, and only ``G_i`` is vmapped. Where
``vmap`` has no batching rule for an operator of the forward (the fused kernels of
``nn.LSTM`` and ``nn.GRU``), or ``torch.func`` cannot run it (an RNN on a
``PackedSequence``), the examples are taken one after another instead, by autograd, with
random numbers refused as ``vmap`` refuses them.
The re-runs see the module's own attributes as they were when the call began (a parent
that sets a shared block's dilation before each call, a forward that counts its calls),
and copies of its buffers, and leave the module as they found it.
At a step that ``_verify`` checks, the re-runs' outputs are compared with the module's
output on the whole batch: an argument whose batch dimension is not the examples' (a
``(T, T)`` mask at ``T = n``), or a forward that mixes examples, raises there.
This is correct for any forward that treats examples independently and uses no
randomness (dropout in training mode is refused: its masks could not be reproduced). It
re-runs the module's forward, so it is the fallback, not the fast path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.func import vjp, vmap
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from .. import _verify
from .._batch import has_batch
from .._precision import _param_dtype, _upcast

if TYPE_CHECKING:
    from ..capture import _Call


def generic_grads(call: _Call, n: int, bd: int) -> dict[str, Tensor]:
    """Per-example gradients ``{local_name: (n, *shape)}`` of ``call.module``'s own
    trainable parameters for one recorded call."""
    module = call.module
    dtype = _param_dtype(call)
    used = [k for k, g in enumerate(call.grad_outputs) if g is not None]
    out_index = [call.edge_index[k] for k in used]
    cotangents = tuple(
        _upcast(g, dtype) for g in call.grad_outputs if g is not None
    )  # each (…, n at bd, …)
    if call.shared is None:
        in_leaves, in_spec = tree_flatten((call.args, call.kwargs))
        batched = [i for i, t in enumerate(in_leaves) if has_batch(t, n, bd)]
        g_dim = bd
    else:  # an output that all examples share (module(x) itself has no batch): only G is
        args, kwargs, shapes = call.shared
        in_leaves, in_spec = tree_flatten((args, kwargs))
        batched = []
        cotangents = tuple(
            c.movedim(bd, 0).reshape(n, *shapes[k]) for k, c in zip(used, cotangents, strict=True)
        )  # each (n, *the call's own output shape)
        g_dim = 0
    params = {k: p.detach() for k, p in call.params.items()}
    # the re-runs read and write copies of the buffers: a forward that updates them (a
    # running statistic, a counter) leaves the model's as the forward left them, and is
    # refused below, as its re-run would not read what the forward read
    state = {k: b.clone() for k, b in module.named_buffers()}
    fixed = [_upcast(t.detach(), dtype) if isinstance(t, Tensor) else t for t in in_leaves]

    def example(xs: tuple[Tensor, ...], gs: tuple[Tensor, ...]) -> tuple[Any, Any, Any]:
        """One example's arguments, keywords and output gradients, as a batch of one."""
        leaves = list(fixed)
        for i, x in zip(batched, xs, strict=True):
            leaves[i] = x.unsqueeze(bd)  # a batch of one
        args, kwargs = tree_unflatten(leaves, in_spec)
        if call.shared is None:
            gs = tuple(c.unsqueeze(bd) for c in gs)
        return args, kwargs, gs

    def outputs(theta: dict[str, Tensor], args: Any, kwargs: Any) -> tuple[Tensor, ...]:
        # the module's own forward, as torch.func.functional_call runs it but without the
        # module's hooks: the recorded inputs are those a pre-hook gave the forward, and
        # the output gradients are read at the forward's own output (capture.py)
        with _reparametrize_module(module, {**theta, **state}):
            out_leaves = tree_flatten(module.forward(*args, **kwargs))[0]
        return tuple(out_leaves[j] for j in out_index)

    def one_example(
        xs: tuple[Tensor, ...], gs: tuple[Tensor, ...]
    ) -> tuple[dict[str, Tensor], tuple[Tensor, ...]]:
        args, kwargs, gs = example(xs, gs)
        outs, pullback, *_ = vjp(lambda theta: outputs(theta, args, kwargs), params)
        (g,) = pullback(gs)
        return g, outs if keep else ()

    def by_autograd(
        xs: tuple[Tensor, ...], gs: tuple[Tensor, ...]
    ) -> tuple[dict[str, Tensor], tuple[Tensor, ...]]:
        """:func:`one_example` with autograd, not torch.func (which some forwards, such
        as an RNN's on a PackedSequence, do not run under)."""
        args, kwargs, gs = example(xs, gs)
        theta = {k: p.detach().requires_grad_() for k, p in params.items()}
        with torch.enable_grad():
            outs = outputs(theta, args, kwargs)
            grads = torch.autograd.grad(outs, list(theta.values()), gs, allow_unused=True)
        grads_by_name = {
            k: torch.zeros_like(p) if g is None else g
            for (k, p), g in zip(theta.items(), grads, strict=True)
        }
        return grads_by_name, tuple(o.detach() for o in outs) if keep else ()

    pending = call.verify  # a step whose batch reading is checked (_verify)
    keep = pending is not None  # the re-runs' outputs, for that check
    xs = tuple(fixed[i] for i in batched)
    attrs, versions = call.attrs or ({}, {})
    modified = [k for k, version in versions.items() if attrs[k]._version != version]
    if modified:
        raise RuntimeError(
            f"{call.label} has no rule of its own, and the generic rule cannot re-run its "
            f"forward because its tensor attributes {modified} were modified in place after "
            "the call began (by its forward, or before the backward): a re-run would not "
            "read what the call read. Assign a new tensor instead (the re-runs see the "
            "attributes as the call began), or register a rule for the module with "
            "indigrad.register_rule."
        )
    whole: tuple[Tensor, ...] = ()
    with _as_called(module, attrs):
        try:
            with torch.no_grad():
                out, rows = vmap(one_example, in_dims=(bd, g_dim), randomness="error")(
                    xs, cotangents
                )
        except RuntimeError as err:
            if "randomness" in str(err):
                raise _random(call) from err
            # vmap has no batching rule for some operators (the fused kernels of nn.LSTM
            # and nn.GRU), and torch.func runs some forwards not at all: one example after
            # another instead, each as a batch of one, by autograd, refusing random numbers
            # as vmap would have. An error of the forward itself is raised again, by the
            # first example.
            with torch.no_grad(), _NoRandomness(call):
                out, rows = _one_by_one(by_autograd, xs, bd, cotangents, g_dim, n)
    if keep:  # the output on the whole batch, for the check
        with _as_called(module, attrs):
            whole = tuple(o.detach() for o in outputs(params, *tree_unflatten(fixed, in_spec)))
    changed = [k for k, b in state.items() if b._version]
    if changed:
        raise RuntimeError(
            f"{call.label} has no rule of its own, and the generic rule cannot re-run its "
            f"forward because the forward updates its buffers {changed} in place: a "
            "re-run would read them as the forward left them, not as it found them. Put "
            "the module in eval mode if that stops the updates, or register a rule for it "
            "with indigrad.register_rule."
        )
    if pending is not None:
        compared = True  # every row that could be compared was
        for k, (row, one) in enumerate(zip(rows, whole, strict=True)):
            # (n, *one example's output, batch of one) and (n, ...) at the batch's place
            coarse = _verify.reduced(one.device)
            over = _verify.rerun_apart(row.squeeze(bd + 1), one.movedim(bd, 0), coarse)
            if over > 1:
                raise _verify.rerun_differs(call.label, k, bd, n, over)
            compared = compared and over == over  # nan: overflowed in one of the two
        if compared:  # (not: the step's pattern is checked again at its next step)
            pending.passed(call)
    return out


# what every module keeps in its __dict__: its state, not attributes of its own
_MODULE_STATE = frozenset(vars(torch.nn.Module()))


def own_attributes(module: Any) -> dict[str, Any]:
    """The module's own attributes (not its parameters, buffers, children or hooks)."""
    return {k: v for k, v in vars(module).items() if k not in _MODULE_STATE}


@contextmanager
def _as_called(module: Any, attrs: dict[str, Any]) -> Iterator[None]:
    """The module's own attributes set back to ``attrs`` (as its call began) for the block,
    and to what they are now after it, whatever the block (the re-runs) set."""
    now = vars(module)
    before = own_attributes(module)
    now.update(attrs)
    try:
        yield
    finally:
        for k in [k for k in now if k not in _MODULE_STATE and k not in before]:
            del now[k]
        now.update(before)


def _random(call: _Call) -> RuntimeError:
    why = f" It is re-run because {call.rerun_because}." if call.rerun_because else ""
    return RuntimeError(
        f"{call.label} has no rule of its own, and the generic rule cannot re-run its "
        "forward because it draws random numbers (dropout in training mode?)."
        f"{why} Put the module in eval mode, or register a rule for it with "
        "indigrad.register_rule."
    )


class _NoRandomness(TorchDispatchMode):
    """Raise on any operator that draws random numbers (``vmap``'s ``randomness="error"``
    for the loop of :func:`_one_by_one`): a re-run would draw other numbers than the
    forward did."""

    def __init__(self, call: _Call) -> None:
        super().__init__()
        self.call = call

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if torch.Tag.nondeterministic_seeded in func.tags:
            raise _random(self.call)
        return func(*args, **(kwargs or {}))


def _one_by_one(
    fn: Callable[
        [tuple[Tensor, ...], tuple[Tensor, ...]], tuple[dict[str, Tensor], tuple[Tensor, ...]]
    ],
    xs: tuple[Tensor, ...],
    bd: int,
    gs: tuple[Tensor, ...],
    g_dim: int,
    n: int,
) -> tuple[dict[str, Tensor], tuple[Tensor, ...]]:
    """What ``vmap(fn, in_dims=(bd, g_dim))(xs, gs)`` gives, by a loop over the ``n``
    examples: ``{local_name: (n, *shape)}`` and each output's ``(n, *one example's)``."""
    per_example = [
        fn(tuple(x.select(bd, i) for x in xs), tuple(g.select(g_dim, i) for g in gs))
        for i in range(n)
    ]
    grads = {k: torch.stack([g[k] for g, _ in per_example]) for k in per_example[0][0]}
    outs = tuple(torch.stack(o) for o in zip(*(o for _, o in per_example), strict=True))
    return grads, outs
