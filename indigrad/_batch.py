"""Which tensors carry the batch: the one test every part of indigrad shares."""

from __future__ import annotations

from typing import Any

from torch import Tensor


def has_batch(t: Any, n: int, bd: int) -> bool:
    """``t`` is a tensor whose dimension ``bd`` has the batch's ``n`` entries."""
    return isinstance(t, Tensor) and t.dim() > bd and t.shape[bd] == n
