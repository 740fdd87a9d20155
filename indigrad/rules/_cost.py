"""Ghost or materialised: the per-call cost choice of the layers with a product form.

Linear over tokens and conv over positions give each example's weight gradient as a sum
of ``T`` outer products, ``dW_i = Σ_t G_it ⊗ A_it`` (``G_it`` of width ``a``, ``A_it`` of
width ``b``). Its squared norm has two forms:

    ghost         ⟨G_i G_iᵀ, A_i A_iᵀ⟩: two T×T Grams    ≈ T² (a + b) multiply-adds
    materialised  ‖dW_i‖² from dW_i itself              ≈ T a b multiply-adds, a b elements

For the norms alone the cheaper count decides. A clipped sum also needs ``Σ_i c_i dW_i``:
the ghost form then adds one weighted product (≈ T a b, what the plain backward does),
while materialised ``dW_i`` give it as a contraction over the examples. Materialising
then costs ≈ ``a b`` elements written and read twice more, instead of the Grams. It is
chosen where the Grams cost more than those passes, measured in multiply-adds per element
pass (``_PASS_COST``), and where memory allows.

Memory: a materialised call keeps ``dW_i`` (``a b`` elements per example) until the sums
and drops its ``A`` and ``G`` (``held`` elements per example: ``T (a + b)`` for Linear, the
input and output gradient for conv, whose ``A`` is unfolded only while it is used). Where
``dW_i`` is larger than what it frees, the difference counts against

- ``_GROWTH``: ``dW_i`` may take at most this many times ``held``;
- on a GPU, a budget for the whole clipped sum (:func:`memory_budget`): a share
  (``_BUDGET_SHARE``) of all the calls' ``held``, spent on the calls in the order their
  norms are taken. Without it, materialising every layer of a GPT-style model raised the
  clipped step's peak memory to 1.36× plain's on an H200; all ghost kept it at 1.03× but
  ran about 10 % slower.

Where memory rules out keeping ``dW_i``, the norm still comes from a transient ``dW_i``
if that is the cheaper norm, and the sum from the weighted product.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

# Multiply-adds that cost as much as writing and twice reading one element of dW_i.
# CPU: on a 2-core x86 machine (benchmarks/README.md, "ghost or materialised") a layer
# alone measured ~20; in the GPT's whole clipped step 38 (its wide head takes the Grams,
# the other layers materialise) timed as 20 within noise and faster than 41 or 50, and
# keeps the head's n × 1024 × 128 gradients out of memory (benchmarks/pass_cost.py).
# Other devices: estimated from fp32 throughput over memory bandwidth (H100: ≈ 30 T
# multiply-adds/s, 3.35 TB/s, 12 bytes per element); on an H200, 30 and 100 chose alike.
_PASS_COST = {"cpu": 38}
_PASS_COST_DEFAULT = 100
# How many times the elements of the layer's own A and G a kept dW_i may take. CPU: 5, so
# that a 3×3 conv at few positions keeps dW_i (4.5× its input and G), which measured
# faster there (benchmarks/README.md, "ghost or materialised"); elsewhere 2, the budget
# below bounding the total.
_GROWTH = {"cpu": 5.0}
_GROWTH_DEFAULT = 2.0
# The share of all calls' A and G that kept dW_i may add, per clipped sum (None: no
# budget; the CPU has no peak-memory target).
_BUDGET_SHARE: dict[str, float | None] = {"cpu": None}
_BUDGET_SHARE_DEFAULT = 0.3

_BUDGET: ContextVar[list[float] | None] = ContextVar("indigrad_memory_budget", default=None)


def ghost_norm(T: int, a: int, b: int) -> bool:
    """For the norms alone: the two T×T Grams cost less than materialising."""
    return T * (a + b) < a * b


@contextmanager
def memory_budget(held: int, device: torch.device) -> Iterator[None]:
    """Within the block, kept ``dW_i`` may add up to ``_BUDGET_SHARE`` × ``held``
    elements per example over the ``A`` and ``G`` they free (``held``: the elements per
    example of all calls' ``A`` and ``G``)."""
    share = _BUDGET_SHARE.get(device.type, _BUDGET_SHARE_DEFAULT)
    token = _BUDGET.set(None if share is None else [share * held])
    try:
        yield
    finally:
        _BUDGET.reset(token)


def materialise_to_clip(
    T: int, a: int, b: int, device: torch.device, held: int | None = None
) -> bool:
    """For norms and a clipped sum together: keep ``dW_i`` rather than ``A`` and ``G``.
    ``held``: the elements per example of the call's ``A`` and ``G`` (``T (a + b)``).
    Spends the budget of the enclosing :func:`memory_budget`, if any."""
    held = T * (a + b) if held is None else held
    extra = a * b - held  # elements per example that keeping dW_i adds
    budget = _BUDGET.get()
    if extra > 0:
        if a * b > _GROWTH.get(device.type, _GROWTH_DEFAULT) * held:
            return False
        if budget is not None and extra > budget[0]:
            return False
    if ghost_norm(T, a, b):
        cost = _PASS_COST.get(device.type, _PASS_COST_DEFAULT)
        if T * T * (a + b) < cost * a * b:
            return False  # the Grams cost less than the passes over dW_i
    if extra > 0 and budget is not None:
        budget[0] -= extra
    return True
