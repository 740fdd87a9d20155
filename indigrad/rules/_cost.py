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
pass (``_PASS_COST``), and where memory allows: a materialised call keeps ``dW_i`` (``a b``
elements per example) until the sums and drops its ``A`` and ``G`` (``held`` elements per
example: ``T (a + b)`` for Linear, the input and output gradient for conv, whose ``A`` is
unfolded only while it is used). ``dW_i`` may take ``_GROWTH`` times ``held``: on a GPU no
more than what it replaces, so that the clipped step's peak memory does not grow.
Where the memory test fails, the norm still comes from a transient ``dW_i`` if that is the
cheaper norm, and the sum from the weighted product.
"""

from __future__ import annotations

import torch

# Multiply-adds that cost as much as writing and twice reading one element of dW_i.
# CPU: measured on a 2-core x86 machine (benchmarks/README.md, "ghost or materialised").
# Other devices: estimated from fp32 throughput over memory bandwidth (H100: ≈ 30 T
# multiply-adds/s, 3.35 TB/s, 12 bytes per element), not measured.
_PASS_COST = {"cpu": 20}
_PASS_COST_DEFAULT = 100
# How many times the elements of the layer's own A and G the kept dW_i may take.
# CPU: 5, so that a 3×3 conv at few positions keeps dW_i (4.5× its input and G), which
# measured faster there; GPU: 1, from the clipped step's peak memory on an H200
# (benchmarks/README.md, "ghost or materialised").
_GROWTH = {"cpu": 5.0}
_GROWTH_DEFAULT = 1.0


def ghost_norm(T: int, a: int, b: int) -> bool:
    """For the norms alone: the two T×T Grams cost less than materialising."""
    return T * (a + b) < a * b


def materialise_to_clip(
    T: int, a: int, b: int, device: torch.device, held: int | None = None
) -> bool:
    """For norms and a clipped sum together: keep ``dW_i`` rather than ``A`` and ``G``.
    ``held``: the elements per example of the call's ``A`` and ``G`` (``T (a + b)``)."""
    held = T * (a + b) if held is None else held
    if a * b > _GROWTH.get(device.type, _GROWTH_DEFAULT) * held:
        return False
    if not ghost_norm(T, a, b):
        return True
    return T * T * (a + b) >= _PASS_COST.get(device.type, _PASS_COST_DEFAULT) * a * b
