"""Checking, at run time, that the rows indigrad takes for examples are the examples'.

Whether a layer's input or output has the batch dimension is read from its size there
(``capture._questioned`` and ``_graph.confirm_batch`` follow the cases where that size
could be chance). Where the reading is wrong, every per-example quantity of that layer is
wrong, and nothing in its numbers shows it: a table or a view whose dimension has the
batch's ``n`` entries by chance (``T = n``), a token count equal to ``n``, an op inside
the model that mixes the examples. This module shows it, in two checks.

**Output gradients.** If row ``i`` of a layer's output (along its batch dimension) is
example ``i``'s, only ``losses[i]`` depends on it, so the gradient there of
``Σ_j w_j losses[j]`` is ``w_i`` times that of ``Σ_j losses[j]``. A row that is not
example ``i``'s (a position, a latent, a token of another example) feeds other losses too,
and its gradient mixes their weights. So one more backward, of the weighted losses, to
the same outputs (no weight gradients), tells apart every wrongly batched output,
whatever made it so. The weights are powers of two, at least one: scaling by one is
exact in floating point, so an example's row comes out *exactly* ``w_i`` times the other
(barring overflow, the subnormal range, and kernels that add in a varying order), and the
tolerance can be tight. Each example has its own weight up to 64 examples (8 in float16),
so that no two exchanged rows pass for examples'. The program's backward hooks run in
this backward too, and one that is not linear in the gradient (a clamp) fails it.

**Re-runs.** The generic rule re-runs a module without a rule on each example's rows of
its batched arguments. An argument whose batch dimension is not the examples' (a
``(T, T)`` mask at ``T = n``) is cut wrongly there, though the output's rows are the
examples'; so the re-runs' outputs are compared with the module's output on the whole
batch (``rules/generic.py``).

Both run where the step's pattern of sizes (which dimensions of the layers' inputs and
outputs have ``n`` or one entries) is new to the model: a model whose shapes do not
change is checked once, and one whose batch size or lengths change is checked again
where a size meets the batch size. ``capture(model, verify="always" | "never")``
changes that.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .rules import _ghost

MODES = ("new", "always", "never")

# How far apart a row's two gradients may be, as a share of their size. An example's are
# equal but where a kernel adds in a varying order (atomics on a GPU), or a kernel's path
# depends on where its operands lie in memory; further apart where products run at
# reduced precision (TF32, or bf16 for float32 matrix products), and in half precision.
_EXACT = {torch.float64: 1e-9, torch.float32: 1e-5}
# How far apart a re-run's outputs and the whole batch's may be: a batch of one and the
# whole batch run different kernels, which round differently.
_ROUNDED = {torch.float64: 1e-8, torch.float32: 1e-4}
_REDUCED = 1e-3  # float32 where products run at reduced precision: both checks
_LOW, _LOW_RERUN = 3e-2, 1e-1  # half and bfloat16 gradients and outputs
_FLOOR = 1e-6  # of a tensor's largest row: rows far smaller round as the large ones do
# The weights: powers of two of either sign, at least one (smaller ones would push small
# gradients into the subnormal range, where scaling is not exact), and at most what the
# gradients' type has room for (float16's overflow at 65504).
_POWERS = [s * 2.0**k for k in range(32) for s in (1, -1)]  # 64 values
_POWERS_HALF = [s * 2.0**k for k in range(4) for s in (1, -1)]  # 8 values
# Gradients the plain backward took through the subnormal range round there, where a
# weight's scaling does not: below this many times the smallest normal number of their
# type (times the square root of a row's length) rows are not compared.
_SUBNORMAL = 256

# for each model, the steps' keys seen, and the patterns of sizes checked (each cleared,
# so re-checked, past _KEEP)
_seen: weakref.WeakKeyDictionary[Any, tuple[set[Any], set[Any]]] = weakref.WeakKeyDictionary()
_KEEP = 4096
_generator: list[torch.Generator] = []


def weights(n: int, device: torch.device, half: bool) -> Tensor:
    """``(n,)`` random powers of two of random sign, all different for ``n`` up to 64 (8
    with ``half``, gradients in float16), from a generator of indigrad's own (the
    program's random streams are left as they were). Beyond that some examples share a
    weight, and rows exchanged between two of them pass the check at that step."""
    if not _generator:
        _generator.append(torch.Generator().manual_seed(0x1D16))
    gen = _generator[0]
    values = torch.tensor(_POWERS_HALF if half else _POWERS, dtype=torch.float64)  # (m,)
    m = len(values)
    if n <= m:
        pick = torch.randperm(m, generator=gen)[:n]  # (n,)
    else:
        pick = torch.randint(0, m, (n,), generator=gen)  # (n,)
    return values[pick].to(device)  # (n,)


def reduced(device: torch.device) -> bool:
    """Whether float32 products may run at reduced precision on ``device``: on a GPU
    always taken so (cuDNN's convolutions run in TF32 by default, and kernels there may
    add in a varying order), on a CPU where the program lowered the precision of matrix
    products (bf16)."""
    if device.type != "cpu":
        return True
    return _ghost.reduced(torch.empty(0))


def _pattern(key: tuple[Any, ...]) -> tuple[Any, ...]:
    """``capture.backward``'s key of a step, ``(n, bd, …, shapes…)``, with each size replaced
    by whether it is ``n``, one, or another (not the size itself: a batch size or length
    that changes without meeting the other gives the same pattern)."""
    n = key[0]

    def dims(item: Any) -> Any:
        if isinstance(item, torch.Size):
            return tuple(2 if s == n else 1 if s == 1 else 0 for s in item)
        if isinstance(item, tuple):
            return tuple(map(dims, item))
        return item

    return tuple(map(dims, key[1:]))


def due(model: Any, key: tuple[Any, ...], mode: str) -> bool:
    """Whether this step, of ``capture.backward``'s ``key``, is checked: always, never, or
    where its pattern of sizes is new to ``model``."""
    if mode == "never":
        return False
    if torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
        return False  # a CUDA graph's capture cannot wait for the check's answer
    if mode == "always":
        return True
    seen = _seen.get(model)
    if seen is None:
        return True
    exact, patterns = seen
    if key in exact:  # the common case: these very sizes were seen
        return False
    if _pattern(key) in patterns:
        exact.add(key)
        return False
    return True


def passed(model: Any, key: tuple[Any, ...]) -> None:
    """Remember that ``model`` passed the checks at ``key``."""
    exact, patterns = _seen.setdefault(model, (set(), set()))
    if len(exact) >= _KEEP:
        exact.clear()
    if len(patterns) >= _KEEP:
        patterns.clear()
    exact.add(key)
    patterns.add(_pattern(key))


class Pending:
    """The re-run checks of a step's calls without a rule (run when their gradients are
    taken): the step's pattern counts as checked once all have passed."""

    def __init__(self, model: Any, key: tuple[Any, ...], calls: list[Any]) -> None:
        self.model, self.key, self.calls = model, key, calls
        self.left = {id(None), *(id(call) for call in calls)}  # None: the gradients' check

    def passed(self, call: Any) -> None:
        """``call``'s re-runs passed (None: the output gradients' check did)."""
        self.left.discard(id(call))
        if not self.left:
            passed(self.model, self.key)


def weighted_grads(losses: Tensor, w: Tensor, edges: Sequence[Any]) -> tuple[Tensor | None, ...]:
    """The gradients at ``edges`` of ``Σ_i w_i losses[i]``, keeping the graph for the
    backward that follows."""
    n = losses.shape[0]
    scaled = losses * w.to(losses.dtype).view(n, *[1] * (losses.dim() - 1))  # (n, ...)
    return torch.autograd.grad(scaled.sum(), list(edges), retain_graph=True, allow_unused=True)


def scaled_apart(
    g: Tensor, gw: Tensor, w: Tensor, at: int, low: bool, coarse: bool, half: bool
) -> float:
    """How far the rows of ``gw / w_i`` (the weighted backward's gradient, divided by
    each row's weight: exact, a power of two) are from those of ``g`` (the plain
    backward's), along dimension ``at``, as a multiple of the tolerance: above 1, a row
    is not an example's. ``low``: gradients of half precision in the backward; ``half``:
    of float16, whose subnormal range starts high; ``coarse``: float32 products at
    reduced precision (:func:`reduced`)."""
    if low:
        tol = _LOW
    elif coarse and g.dtype == torch.float32:
        tol = _REDUCED
    else:
        tol = _EXACT.get(g.dtype, _LOW)
    n = w.shape[0]
    gw = gw.detach().movedim(at, 0).reshape(n, -1)  # (n, k)
    unweighted = gw / w.to(gw.device, _exact_type(gw.dtype))[:, None]  # (n, k), exact
    tiny = torch.finfo(torch.float16 if half else g.dtype).tiny
    return _apart(unweighted, g.movedim(at, 0), tol, tiny)


def rerun_apart(rows: Tensor, whole: Tensor, coarse: bool) -> float:
    """How far the re-runs' outputs ``rows`` are from the whole batch's ``whole`` (both
    ``(n, ...)``), as a multiple of the tolerance: above 1, a re-run did not compute its
    example's rows. ``coarse``: float32 products at reduced precision."""
    if rows.shape != whole.shape:
        return float("inf")
    dtype = rows.dtype
    tol = _REDUCED if coarse and dtype == torch.float32 else _ROUNDED.get(dtype, _LOW_RERUN)
    return _apart(rows, whole, tol, torch.finfo(dtype).tiny)


def _apart(a: Tensor, b: Tensor, tol: float, tiny: float) -> float:
    """The largest distance of a row of ``a`` from that of ``b`` (``(n, ...)`` each), as a
    multiple of ``tol`` times the rows' size, plus what rounding in the subnormal range
    below ``tiny`` (the smallest normal number) may add. Rows not finite in both are left
    out (an example whose loss is); NaN where a row is finite in one and not in the other
    (it overflowed in one of the two computations: they cannot be compared)."""
    n = a.shape[0]
    dtype = _exact_type(b.dtype)
    a = a.detach().reshape(n, -1).to(dtype)  # (n, k)
    b = b.detach().reshape(n, -1).to(dtype)  # (n, k)
    if not n:
        return 0.0
    finite = a.isfinite().all(1)  # (n,)
    if not torch.equal(finite, b.isfinite().all(1)):
        return float("nan")  # a row overflowed in one computation: not compared
    a, b = a[finite], b[finite]  # (m, k): rows not finite in both (an inf example) left out
    if not len(a):
        return 0.0
    diff = (a - b).norm(dim=1).double()  # (m,)
    size = a.norm(dim=1).double() + b.norm(dim=1).double()  # (m,)
    below = _SUBNORMAL * tiny * a.shape[1] ** 0.5  # rounded in the subnormal range
    bound = tol * (size + _FLOOR * size.max()) + below  # (m,)
    over = torch.where(diff > 0, diff / bound.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    return float(over.max())


def _exact_type(dtype: torch.dtype) -> torch.dtype:
    """The type the comparisons take: float32 or float64 as they are (equal rows subtract
    to exactly zero; unequal ones round far below the tolerances), halves in float32."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


_FALSE_ALARM = (
    "(Where indigrad.testing.check finds the per-example gradients equal to the "
    "per-example loop's, this is a false alarm: please report it; "
    'capture(model, verify="never") skips the check.)'
)


def not_examples(label: str, what: str, at: int, n: int, over: float) -> RuntimeError:
    return RuntimeError(
        f"{label}: the rows of {what} along its batch dimension {at} ({n} entries, as "
        "many as the losses) are not one example's each. indigrad checks this by a second "
        "backward of the losses weighted per example: a row that is example i's alone has "
        "a gradient exactly w_i times its plain one, and these are not (off by "
        f"{over:.3g} times the tolerance). So another tensor's dimension has {n} entries "
        "by chance (a table, positions, latents or tokens as many as the examples; a "
        "sequence-first view at T = n), or the model mixes examples after this layer "
        "(batch statistics; a loss of one example that reads another's outputs), and every "
        "per-example quantity of this layer would be wrong. Make such sizes differ from "
        "the batch size, call the layer on the batch's own tensors, or freeze it. " + _FALSE_ALARM
    )


def rerun_differs(label: str, k: int, bd: int, n: int, over: float) -> RuntimeError:
    output = "output" if k == 0 else f"output {k}"
    return RuntimeError(
        f"{label} has no rule of its own, and re-running it on one example's rows of its "
        f"arguments (those with {n} entries in dimension {bd}) did not give that "
        f"example's rows of its {output} on the whole batch (off by {over:.3g} times the "
        "tolerance): an argument whose dimension has as many entries as the batch by "
        "chance (a (T, T) mask at T = n) is not the examples', or the forward mixes the "
        "examples (x - x.mean(0)), so its per-example gradients would be wrong. Make such "
        "sizes differ from the batch size, or register a rule for the module with "
        "indigrad.register_rule. " + _FALSE_ALARM
    )
