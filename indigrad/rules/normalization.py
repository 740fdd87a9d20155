"""Normalisation layers: ``y = x̂ ⊙ γ + β``, ``x̂`` the input normalised per example.

Every layer here scales and shifts a normalised input ``x̂`` by ``γ`` (``weight``) and
``β`` (``bias``). The statistics behind ``x̂`` come from one example alone (LayerNorm,
RMSNorm, GroupNorm, InstanceNorm) or are fixed running statistics (BatchNorm in eval
mode, InstanceNorm in eval mode with ``track_running_stats``), so ``x̂`` does not depend
on the parameters and each example's gradient is the last step by hand:

    LayerNorm, RMSNorm       x (n, *, *S), γ and β of shape S; positions r: the * dims
    GroupNorm, InstanceNorm, x (n, C, *), γ and β of shape (C,); positions r: the * dims
    BatchNorm (eval), torchvision's LayerNorm2d (ConvNeXt: LayerNorm over the channels)

Summing over the positions ``r`` that share the parameters (no reshape, no copy):

    grads        dγ_i = Σ_r x̂_ir ⊙ G_ir                   (x̂ ⊙ G).sum(positions)
                 dβ_i = Σ_r G_ir                           G.sum(positions)

On a GPU, GroupNorm takes both from its own backward kernel instead, run on the batch as
one example of ``n·C`` channels in ``n·groups`` groups: that example's ``dγ`` and ``dβ``
are the ``(n, C)`` per-example ones, in one operation instead of four. Its statistics
(each example's mean and 1/std per group) are those the forward saved for the backward,
taken from the autograd graph before the backward frees them; without them (a rule
called directly) one more operation recomputes them. Inputs that are not contiguous take
the sums. Same-shaped GroupNorms (a ResNet stage's) take theirs from one kernel call, as
one example of ``n·k·C`` channels per batch, for the norms and the clipped sum
(:func:`group_norm_stacked_grads`, into the joint of ``indigrad/_joint.py``).

The per-example gradients ``(n, P)`` are never bigger than ``x``, so the rules have no
fast paths: indigrad materialises them once and takes both the norms and the weighted sum
``Σ_i c_i dγ_i`` from them, which computes ``x̂`` once per call.

On a CPU, LayerNorm's ``x̂`` is ``(x - mean) · rstd`` from the statistics its forward
saved, taken from the graph in the same way (two elementwise operations, against a
``layer_norm`` kernel that is slower there), for float32 and float64 inputs.

Elsewhere ``x̂`` is recomputed by the functional op the module's forward calls, with the
same ``eps`` and statistics but without ``γ`` and ``β``, so it carries the module's own numerics
(biased variance, channels grouped, RMSNorm's ``eps=None`` meaning the machine epsilon of
its computation type). It is computed in the output gradient's dtype, the dtype the
module computed in, should the input arrive in a narrower one (autocast runs these
layers in ``float32`` on ``bfloat16`` inputs).

Where the statistics mix the examples of the batch no per-example gradient exists, and
the rules raise: BatchNorm in training mode (the capture refuses it already), BatchNorm
in eval mode without running statistics (``track_running_stats=False``: it then
normalises by batch statistics), and a LayerNorm or RMSNorm whose ``normalized_shape``
covers the batch dimension.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeGuard

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from .. import _stack
from .registry import Rule, register_rule

Normalise = Callable[[Any, Tensor], Tensor]  # (module, x) -> x̂
Validate = Callable[[Any, Tensor], None]  # raises where the statistics mix examples


# The ops the modules' forwards reach, called directly: the functional wrappers only
# check what the forward checked already, and each check costs the host time per call.
def _layer_norm(module: Any, x: Tensor) -> Tensor:
    return torch.layer_norm(x, module.normalized_shape, None, None, module.eps)  # (n, *, *S)


# Devices where LayerNorm's x̂ comes from the statistics its forward saved, as two
# elementwise operations, rather than from layer_norm again: the CPU, whose layer_norm
# took 0.16 ms on a GPT's (16, 64, 128) against 0.04 ms for the two. On a GPU layer_norm
# is one kernel against two.
_LN_SAVED_DEVICES = {"cpu"}


def _layer_norm_saved(node: Any) -> tuple[Tensor, Tensor] | None:
    """The statistics LayerNorm's forward saved for its backward, on the devices where
    the rule uses them: each row's mean and 1/std, ``(n, *, 1, …)`` each."""
    if type(node).__name__ != "NativeLayerNormBackward0":
        return None
    mean = node._saved_result1
    if not isinstance(mean, Tensor) or mean.device.type not in _LN_SAVED_DEVICES:
        return None
    return mean, node._saved_result2


def _statistics_of(
    saved: Any, shape: tuple[int, ...], x: Tensor
) -> TypeGuard[tuple[Tensor, Tensor]]:
    """``saved`` (what a rule's ``saved`` took from the graph, or None) is a mean and a
    1/std of ``shape`` in ``x``'s dtype and device: statistics of ``x`` (the forward
    computed them in the dtype the module computed in, which the rule's ``x`` is cast
    to)."""
    return (
        isinstance(saved, tuple)
        and len(saved) == 2
        and all(
            isinstance(t, Tensor)
            and t.shape == shape
            and t.dtype == x.dtype
            and t.device == x.device
            for t in saved
        )
    )


def _layer_norm_from(module: Any, x: Tensor, saved: Any) -> Tensor:
    """LayerNorm's ``x̂``, from the forward's statistics where they are those of ``x``
    (float32 or float64, whose two operations round as the kernel does; a narrower
    dtype's statistics are rounded, and its kernel computes in float32), else anew."""
    k = len(module.normalized_shape)
    rows = (*x.shape[: x.dim() - k], *(1,) * k)
    if x.dtype in (torch.float32, torch.float64) and _statistics_of(saved, rows, x):
        mean, rstd = saved  # (n, *, 1, …) each
        return torch.sub(x, mean).mul_(rstd)  # (n, *, *S)
    return _layer_norm(module, x)


def _rms_norm(module: Any, x: Tensor) -> Tensor:
    return F.rms_norm(x, module.normalized_shape, None, module.eps)  # (n, *, *S)


def _group_norm(module: Any, x: Tensor) -> Tensor:
    return torch.group_norm(x, module.num_groups, None, None, module.eps)  # (n, C, *)


def _layer_norm_2d(module: Any, x: Tensor) -> Tensor:
    """torchvision's ``LayerNorm2d``: LayerNorm over the channels of (n, C, H, W)."""
    return _layer_norm(module, x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (n, C, H, W)


def _instance_norm(module: Any, x: Tensor) -> Tensor:
    if module.training or not module.track_running_stats:  # each example's own statistics
        return F.instance_norm(x, None, None, None, None, True, 0.0, module.eps)  # (n, C, *)
    rm, rv = module.running_mean, module.running_var  # (C,), (C,)
    return F.instance_norm(x, rm, rv, None, None, False, 0.0, module.eps)  # (n, C, *)


def _batch_norm(module: Any, x: Tensor) -> Tensor:
    rm, rv = module.running_mean, module.running_var  # (C,), (C,)
    return F.batch_norm(x, rm, rv, None, None, False, 0.0, module.eps)  # (n, C, *)


def _running_stats(module: Any, x: Tensor) -> None:
    _channels_second(module, x)
    if module.training or module.running_mean is None or module.running_var is None:
        why = (
            "is in training mode"
            if module.training
            else "has no running statistics (track_running_stats=False), so even in eval "
            "mode it normalises by the statistics of the batch"
        )
        raise RuntimeError(
            f"{type(module).__name__} {why}: its batch statistics mix the examples of a "
            "batch, so no per-example gradient exists. Use eval mode with running "
            "statistics (track_running_stats=True), or replace it with GroupNorm / LayerNorm."
        )


def _trailing_only(module: Any, x: Tensor) -> None:
    shape = tuple(module.normalized_shape)
    if x.dim() <= len(shape) or tuple(x.shape[x.dim() - len(shape) :]) != shape:
        raise RuntimeError(
            f"{type(module).__name__} with normalized_shape {shape} got an input of shape "
            f"{tuple(x.shape)} (batch dimension first): its statistics cover the batch "
            "dimension and mix the examples, so no per-example gradient exists. Normalise "
            "over the trailing feature dimensions only."
        )


def _channels_second(module: Any, x: Tensor) -> None:
    C = _param_shape(module)[0]
    if x.dim() < 2 or x.shape[1] != C:
        raise RuntimeError(
            f"{type(module).__name__} with {C} channels got an input of shape "
            f"{tuple(x.shape)} (batch dimension first): its channels must come right "
            "after the batch dimension"
        )


def _param_shape(module: Any) -> torch.Size:
    p = module.weight if module.weight is not None else module.bias
    return p.shape  # γ.shape == β.shape


def _positions(module: Any, t: Tensor, params_last: bool) -> tuple[int, ...]:
    """The dims of ``t`` (the input's shape, batch first) indexing positions that share
    the parameters."""
    if params_last:  # (n, *, *S)
        return tuple(range(1, t.dim() - len(_param_shape(module))))
    return tuple(range(2, t.dim()))  # (n, C, *)


def _inputs(
    module: Any, inputs: tuple[Any, ...], G: Tensor, validate: Validate
) -> tuple[Tensor, Tensor]:
    x = inputs[0]  # the input, batch first
    if x.shape != G.shape:
        raise RuntimeError(
            f"{type(module).__name__}: input {tuple(x.shape)} and output gradient "
            f"{tuple(G.shape)} differ in shape"
        )
    validate(module, x)  # before any work: also when only the bias is trainable
    return (x if x.dtype == G.dtype else x.to(G.dtype)), G


def _trainable(p: nn.Parameter | None) -> bool:
    return p is not None and p.requires_grad


Grads = Callable[[Any, tuple[Any, ...], Tensor], dict[str, Tensor]]


def _make_grads(
    normalise: Normalise,
    validate: Validate,
    params_last: bool,
    from_saved: Callable[[Any, Tensor, Any], Tensor] | None = None,
) -> Grads:
    """The rule's grads; with ``from_saved``, ``x̂`` is ``from_saved(module, x, saved)``
    where the rule's inputs end with what its ``saved`` took from the graph."""

    def grads(module: Any, inputs: tuple[Any, ...], G: Tensor) -> dict[str, Tensor]:
        x, G = _inputs(module, inputs, G, validate)  # (n, *), (n, *)
        r = _positions(module, G, params_last)  # none: one position per example
        out = {}
        if _trainable(module.weight):
            if from_saved is not None and len(inputs) > 1:
                xhat = from_saved(module, x, inputs[-1])  # (n, *)
            else:
                xhat = normalise(module, x)  # (n, *)
            xhat_G = xhat.mul_(G)  # (n, *)
            out["weight"] = xhat_G.sum(r) if r else xhat_G  # (n, *shape)
        if _trainable(getattr(module, "bias", None)):
            out["bias"] = G.sum(r) if r else G.clone()  # (n, *shape)
        return out

    return grads


def _make_rule(
    cls: type[nn.Module], normalise: Normalise, validate: Validate, params_last: bool
) -> Rule:
    return register_rule(cls, grads=_make_grads(normalise, validate, params_last))


# Devices where a GroupNorm's per-example dγ and dβ come from GroupNorm's own backward
# kernel, run on the batch as one example of n·C channels in n·groups groups: one
# operation instead of four (with the forward's statistics), which counts where the
# host's dispatch sets the pace (a GPU). Not on CPU, where that kernel is slower than
# the sums at ResNet-18's few positions and many channels.
_GN_KERNEL_DEVICES = {"cuda"}

_group_norm_sums = _make_grads(_group_norm, _channels_second, params_last=False)


# the kernels by their overload: calling an op's packet resolves the overload every time
_GN_STATISTICS = torch.ops.aten.native_group_norm.default
_GN_SUMS = torch.ops.aten.native_group_norm_backward.default

_ONES: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}


def _ones(n: int, C: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A γ of ones ``(n, C)`` for the kernel, read only: the first ``n`` rows of one kept
    per channel count, dtype and device, so that batches of varying size (Poisson
    sampling) take a view of it rather than a new one each step.

    Made anew inside a CUDA graph's capture, as the graph's own: a kept one is replaced
    when a larger batch comes, and freed, while a graph that read it would read its memory
    at every replay; and one made inside the capture is filled only when the graph runs."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return torch.ones((n, C), dtype=dtype, device=device)
    key = (C, dtype, device)
    ones = _ONES.get(key)
    if ones is None or ones.shape[0] < n:
        ones = _ONES[key] = torch.ones((n, C), dtype=dtype, device=device)
    return ones if ones.shape[0] == n else ones[:n]  # (n, C), contiguous


def _group_norm_saved(node: Any) -> tuple[Tensor, Tensor] | None:
    """The statistics GroupNorm's forward computed and saved for its backward: each
    example's mean and 1/std per group, ``(n, groups)`` each (None for another node)."""
    if type(node).__name__ != "NativeGroupNormBackward0":
        return None
    return node._saved_result1, node._saved_result2


def _group_norm_grads(module: Any, inputs: tuple[Any, ...], G: Tensor) -> dict[str, Tensor]:
    if G.device.type not in _GN_KERNEL_DEVICES:  # CPU: validated once, by the sums
        return _group_norm_sums(module, inputs, G)
    x, G = _inputs(module, inputs, G, _channels_second)  # (n, C, *), (n, C, *)
    if x.numel() == 0 or not (x.is_contiguous() and G.is_contiguous()):
        return _group_norm_sums(module, (x,), G)
    n, C = x.shape[:2]
    saved = inputs[-1] if len(inputs) > 1 else None  # the forward's statistics, if recorded
    if _kernel_statistics(saved, module, x):
        mean, rstd = saved  # (n, groups) each: the kernel reads n·groups in order
    else:
        P, groups = x.numel() // (n * C), module.num_groups * n  # positions; groups of all
        _, mean, rstd = _GN_STATISTICS(
            x.view(1, n * C, P), None, None, 1, n * C, P, groups, module.eps
        )  # each example's statistics per group: (1, n·groups) each
    weight, bias = _trainable(module.weight), _trainable(module.bias)
    return _kernel_grads(G, x, mean, rstd, module.num_groups, weight, bias)


def _kernel_statistics(saved: Any, module: Any, x: Tensor) -> TypeGuard[tuple[Tensor, Tensor]]:
    """``saved`` holds the forward's statistics of ``x``, ``(n, groups)`` each, laid out as
    the kernel reads them."""
    shape = (x.shape[0], module.num_groups)
    return _statistics_of(saved, shape, x) and all(t.is_contiguous() for t in saved)


def _kernel_grads(
    G: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, groups: int, weight: bool, bias: bool
) -> dict[str, Tensor]:
    """Each example's dγ and dβ ``(n, W)`` from GroupNorm's backward kernel, run on ``x``
    and ``G`` ``(n, W, *)``, contiguous, as one example of ``n·W`` channels in
    ``n·groups`` groups (``mean`` and ``rstd``: ``n·groups`` each, example by example)."""
    n, W = x.shape[:2]
    P = x.numel() // (n * W)  # positions
    # The kernel reads its tensors by their element counts alone, so x and G go in as they
    # are, and dγ and dβ come out shaped like the γ it is given, (n, W), in some torch
    # releases (others make them (n·W,)): views only where needed, each a dispatch on the
    # host.
    _, dw, db = _GN_SUMS(
        G,
        x,
        mean,
        rstd,
        _ones(n, W, x.dtype, x.device),
        1,
        n * W,
        P,
        n * groups,
        [False, weight, bias],
    )  # (n, W) each: dγ = Σ_p x̂ G, dβ = Σ_p G per channel of each example
    out = {}
    if weight:
        out["weight"] = dw if dw.dim() == 2 else dw.view(n, W)
    if bias:
        out["bias"] = db if db.dim() == 2 else db.view(n, W)
    return out


# Devices where same-shaped GroupNorms take their per-example dγ and dβ from one call of
# the kernel above: their inputs, output gradients and statistics side by side, as the
# channels of one example per example. Four copies and one operation per stack instead of
# one operation and two views per call (ResNet-18's stages: four or five calls each), on a
# GPU, whose step is bound by the host issuing operations.
_GN_STACKED = {"cuda"}


def group_norm_stack_key(module: Any, inputs: tuple[Any, ...], G: Any) -> tuple[Any, ...] | None:
    """What GroupNorm calls must share to take dγ and dβ from one kernel call
    (:func:`group_norm_stacked_grads`): the kernel's path with the forward's statistics,
    and the same shapes, dtype, device and groups. None for a call that takes its own
    (:func:`_group_norm_grads`, which also raises for a wrong input)."""
    x = inputs[0]
    if not (isinstance(x, Tensor) and isinstance(G, Tensor)) or len(inputs) < 2:
        return None
    device = x.device.type
    if device not in _GN_STACKED or device not in _GN_KERNEL_DEVICES:
        return None
    if x.dim() < 2 or x.shape != G.shape or x.shape[1] != module.num_channels:
        return None
    if x.dtype != G.dtype or x.numel() == 0 or not (x.is_contiguous() and G.is_contiguous()):
        return None
    if not _kernel_statistics(inputs[-1], module, x):  # the forward's, (n, groups) each
        return None
    return x.shape, x.dtype, x.device, module.num_groups


def group_norm_stacked_grads(
    modules: list[Any], inputs: list[tuple[Any, ...]], Gs: list[Tensor], names: set[str]
) -> dict[str, Tensor]:
    """dγ and dβ of ``k`` GroupNorm calls with one :func:`group_norm_stack_key`, from one
    kernel call: ``{"weight": (n, k·C), "bias": (n, k·C)}`` (those in ``names``), call
    after call in each row.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> a, b = nn.GroupNorm(2, 4).double(), nn.GroupNorm(2, 4).double()
        >>> x, G = torch.randn(2, 3, 4, 5, dtype=torch.float64)
        >>> stats = lambda m: torch.ops.aten.native_group_norm(x, None, None, 3, 4, 5, 2, m.eps)[1:]
        >>> inputs = [(x, stats(a)), (x, stats(b))]
        >>> grads = group_norm_stacked_grads([a, b], inputs, [G, G], {"weight", "bias"})
        >>> one = _group_norm_sums(a, (x,), G)["weight"]   # (3, 4)
        >>> torch.allclose(grads["weight"], torch.cat([one, one], 1))
        True
    """
    X = torch.cat([i[0] for i in inputs], 1)  # (n, k·C, *)
    G = torch.cat(Gs, 1)  # (n, k·C, *)
    mean = torch.cat([i[-1][0] for i in inputs], 1)  # (n, k·g): call after call per example
    rstd = torch.cat([i[-1][1] for i in inputs], 1)  # (n, k·g)
    groups = len(modules) * modules[0].num_groups  # k·g in each example's n·k·C channels
    return _kernel_grads(G, X, mean, rstd, groups, "weight" in names, "bias" in names)


LAYER_NORM = register_rule(
    nn.LayerNorm,
    Rule(
        _make_grads(_layer_norm, _trailing_only, params_last=True, from_saved=_layer_norm_from),
        saved=_layer_norm_saved,
    ),
)
RMS_NORM = _make_rule(nn.RMSNorm, _rms_norm, _trailing_only, params_last=True)
GROUP_NORM = register_rule(nn.GroupNorm, Rule(_group_norm_grads, saved=_group_norm_saved))
_stack.JOINT[id(GROUP_NORM)] = _stack.JointStack(group_norm_stack_key, group_norm_stacked_grads)
INSTANCE_NORM = _make_rule(_InstanceNorm, _instance_norm, _channels_second, params_last=False)
LAYER_NORM_2D = register_rule(  # by name: torchvision need not be installed
    "torchvision.models.convnext.LayerNorm2d",
    grads=_make_grads(_layer_norm_2d, _channels_second, params_last=False),
)
BATCH_NORM = _make_rule(_BatchNorm, _batch_norm, _running_stats, params_last=False)
SYNC_BATCH_NORM = register_rule(nn.SyncBatchNorm, BATCH_NORM)  # eval mode: F.batch_norm too
