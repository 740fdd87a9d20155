"""Parametrized tensors (``torch.nn.utils.parametrize``: ``weight_norm``, ``spectral_norm``,
``orthogonal``, your own): a module's ``weight`` computed, each time it is read, from the
parameters ``original`` (or ``original0``, ``original1``, …) of its
``parametrizations.weight`` list, and those of the parametrizations in it (a learnt scale,
``parametrizations.weight.0.scale``).

The module's call owns those parameters, and its rule computes the per-example gradients
``dW_i`` of the computed tensor, as for a plain one. The originals' follow by the chain
rule: one vector-Jacobian product of the parametrization, whose forward never sees the
batch, vmapped over ``dW_i``:

    g_i = vjp(θ ↦ parametrization(θ), dW_i)

Norms and clipped sums come from these materialised gradients.

Example:
    >>> import torch, indigrad
    >>> from torch.nn.utils.parametrizations import weight_norm
    >>> model = weight_norm(torch.nn.Linear(3, 2))
    >>> with indigrad.capture(model) as cap:
    ...     grads = cap.grads(model(torch.randn(5, 3)).square().sum(1))
    >>> sorted(grads)
    ['bias', 'parametrizations.weight.original0', 'parametrizations.weight.original1']
    >>> grads["parametrizations.weight.original0"].shape  # weight_norm's g: (out, 1)
    torch.Size([5, 2, 1])
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.nn.utils import parametrize


def parametrized(module: nn.Module, subtree: bool = False) -> dict[str, list[str]]:
    """``{tensor name: local names of its trainable originals}`` of a parametrized module
    (``{}`` for any other); with ``subtree``, of its submodules' too, by their names in it
    (``out_proj.weight``: a rule that covers the subtree, as attention's does). The
    parametrizations' own parameters (a learnt scale) count among the originals: the
    tensor is computed from them too."""
    owners = module.named_modules() if subtree else [("", module)]
    found = {}
    for prefix, owner in owners:
        lists = owner._modules.get("parametrizations")  # a dict lookup: asked of every call
        if not isinstance(lists, nn.ModuleDict) or not parametrize.is_parametrized(owner):
            continue
        at = f"{prefix}." if prefix else ""
        for name, plist in lists.items():
            found[f"{at}{name}"] = [
                f"{at}parametrizations.{name}.{k}"
                for k, p in plist.named_parameters()
                if p.requires_grad
            ]
    return found


def _list(module: nn.Module, name: str) -> tuple[nn.Module, str, nn.Module]:
    """For a parametrized tensor's name in ``module`` (``out_proj.weight``): the module
    that holds it, its name there, and its list of parametrizations."""
    prefix, _, local = name.rpartition(".")
    owner = module.get_submodule(prefix) if prefix else module
    return owner, local, cast(nn.ModuleDict, owner.parametrizations)[local]


@contextmanager
def _as_in_the_forward(module: nn.Module, names: dict[str, list[str]]) -> Iterator[None]:
    """The parametrized tensors, computed once and cached for the block, as the forward
    computed them: with gradient (the rules ask ``weight.requires_grad``) and in eval mode
    (spectral_norm's power iteration keeps the vectors that forward used)."""
    lists = [_list(module, name) for name in names]
    modes = [(plist, plist.training) for _, _, plist in lists]
    try:
        for _, _, plist in lists:
            plist.eval()
        with parametrize.cached():
            with torch.enable_grad():
                for owner, local, _ in lists:
                    getattr(owner, local)
            yield
    finally:
        for plist, training in modes:
            plist.train(training)


def grads(
    rule_grads: Callable[[nn.Module, tuple[Any, ...], Any], dict[str, Tensor]],
    module: nn.Module,
    inputs: tuple[Any, ...],
    G: Any,
    names: dict[str, list[str]],
) -> dict[str, Tensor]:
    """The rule's per-example gradients with each parametrized tensor's (``names``, from
    :func:`parametrized`) replaced by its originals'."""
    with _as_in_the_forward(module, names):
        values = rule_grads(module, inputs, G)
        return _originals(module, names, values)


def _originals(
    module: nn.Module, names: dict[str, list[str]], grads: dict[str, Tensor]
) -> dict[str, Tensor]:
    out = {k: v for k, v in grads.items() if k not in names}
    for name, locals_ in names.items():
        g = grads.get(name)  # (n, *tensor.shape)
        if g is None or not locals_:
            continue
        _, local, plist = _list(module, name)
        at = name[: len(name) - len(local)]  # "out_proj." for "out_proj.weight"
        # "original", "0.scale"
        short = [k[len(f"{at}parametrizations.{local}.") :] for k in locals_]
        originals = {k: plist.get_parameter(k).detach() for k in short}

        def tensor(theta: dict[str, Tensor], plist: nn.Module = plist) -> Tensor:
            return functional_call(plist, theta, ())

        value, pullback = vjp(tensor, originals)[:2]  # in eval mode, as above
        (per,) = vmap(pullback)(g.to(value.dtype))  # {short: (n, *original.shape)}
        for k, s in zip(locals_, short, strict=True):
            out[k] = per[s].to(originals[s].dtype)
    return out
