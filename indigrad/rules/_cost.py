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
pass (``_PASS_COST``), and where the per-example gradients stay within twice the size of
the layer's own ``A`` and ``G`` (which are held anyway), so that memory does not grow.
"""

from __future__ import annotations

import torch

# Multiply-adds that cost as much as writing and twice reading one element of dW_i.
# CPU: measured on a 2-core x86 machine (benchmarks/README.md, "ghost or materialised").
# Other devices: estimated from fp32 throughput over memory bandwidth (H100: ≈ 30 T
# multiply-adds/s, 3.35 TB/s, 12 bytes per element), not measured.
_PASS_COST = {"cpu": 20}
_PASS_COST_DEFAULT = 100


def ghost_norm(T: int, a: int, b: int) -> bool:
    """For the norms alone: the two T×T Grams cost less than materialising."""
    return T * (a + b) < a * b


def materialise_to_clip(T: int, a: int, b: int, device: torch.device) -> bool:
    """For norms and a clipped sum together: materialising ``dW_i`` costs less."""
    if not ghost_norm(T, a, b):
        return True
    cost = _PASS_COST.get(device.type, _PASS_COST_DEFAULT)
    return T * T * (a + b) >= cost * a * b and a * b <= 2 * T * (a + b)
