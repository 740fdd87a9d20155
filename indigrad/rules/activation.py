"""``nn.PReLU``: ``y = max(0, x) + w · min(0, x)``, one ``w`` or one per channel (dim 1).

    grads     dw_i = Σ_positions min(0, x_i) ⊙ G_i        one weight:  (n, 1)
                                                         per channel: (n, C), summed over
                                                         every dim but the channel one
The weight is tiny, so norms and clipped sums are taken from the per-example gradients.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .registry import register_rule


def prelu_grads(module: nn.Module, inputs: tuple[Any, ...], G: Tensor) -> dict[str, Tensor]:
    x = inputs[0]  # (n, C, *) or (n,)
    contrib = x.clamp(max=0) * G  # (n, C, *)
    n = contrib.shape[0]
    if module.weight.numel() == 1:  # type: ignore[operator]
        return {"weight": contrib.reshape(n, -1).sum(1, keepdim=True)}  # (n, 1)
    return {"weight": contrib.reshape(n, contrib.shape[1], -1).sum(2)}  # (n, C)


PRELU = register_rule(nn.PReLU, grads=prelu_grads)
