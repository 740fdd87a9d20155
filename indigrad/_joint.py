"""Small per-example gradients taken together: one norm and one sum for all of them.

A model's normalisation layers and biases have per-example gradients of a few hundred
entries, ``(n, C)``: computing their norms and clipped sums parameter by parameter costs
four or five operations each, and on a GPU every operation costs the host a few
microseconds however small its tensor. A ResNet-18 has 40 such parameters, and its
clipped step was bound by those per-operation costs. So indigrad copies the small
materialised gradients side by side once, ``(n, ΣP)``, and takes

    the norms        ‖[g¹_i, g², …]‖²       one vector norm over the rows
    the clipped sum  Σ_i c_i [g¹_i, g², …]  one matrix-vector product, split into
                                              each parameter's ``.grad`` (disjoint views
                                              of one buffer, as DDP's bucket views)

Only gradients of at most ``_MAX_ELEMENTS`` elements (all examples together) are taken,
so that the copy costs less than the operations it saves; larger ones keep their own.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# The most elements (n × entries) of one gradient worth copying into the joint buffer:
# about what the device writes in the time it takes to launch one more operation
# (a few microseconds at ~3 TB/s on a GPU; ~100 KB on a CPU core).
_MAX_ELEMENTS = {"cpu": 1 << 15}
_MAX_ELEMENTS_DEFAULT = 1 << 20


class Joint:
    """Gradients ``(n, *shape)`` collected by :meth:`take`, then reduced together.

    Example:
        >>> import torch
        >>> joint = Joint()
        >>> a, b = torch.randn(4, 3), torch.randn(4, 2, 2)
        >>> joint.take("a", a), joint.take("b", b)
        (True, True)
        >>> flat = torch.cat([a, b.flatten(1)], 1)
        >>> torch.allclose(joint.sq_norms(), flat.square().sum(1))
        True
        >>> coef = torch.rand(4)
        >>> torch.allclose(joint.weighted_sums(coef)["b"], torch.einsum("n,nij->ij", coef, b))
        True
    """

    def __init__(self) -> None:
        self.names: list[str] = []
        self._parts: list[Tensor] = []  # (n, P_k) each
        self._shapes: list[torch.Size] = []
        self._flat: Tensor | None = None  # (n, ΣP), once the norms are taken
        self._like: tuple[torch.dtype, torch.device, int] | None = None  # dtype, device, n

    def take(self, name: str, g: Tensor) -> bool:
        """Add ``g`` (n, *shape) under ``name`` if it is small and matches the others in
        dtype and device; returns whether it was taken."""
        if not self.accepts(g):
            return False
        block = g if g.dim() == 2 else g.reshape(len(g), math.prod(g.shape[1:]))  # (n, P)
        self._add([name], [g.shape[1:]], block)
        return True

    def accepts(self, g: Tensor) -> bool:
        """Whether :meth:`take` would take ``g``: small, and like the others in dtype,
        device and examples."""
        if g.layout != torch.strided or not g.is_floating_point() or g.dim() == 0:
            return False
        return g.numel() <= self.room(g.dtype, g.device, len(g))

    def room(self, dtype: torch.dtype, device: torch.device, n: int) -> int:
        """The most elements (all examples') a gradient of ``dtype``, on ``device``, of
        ``n`` examples may have to be taken; 0 for one that would not be at all."""
        if self._flat is not None:  # the norms were taken: nothing more joins
            return 0
        if self._like is not None and (dtype, device, n) != self._like:
            return 0
        return _MAX_ELEMENTS.get(device.type, _MAX_ELEMENTS_DEFAULT)

    def take_block(self, names: list[str], shapes: list[torch.Size], block: Tensor) -> bool:
        """Add ``block`` (n, ΣP): the gradients ``(n, *shape)`` of ``names`` side by side,
        flattened, as :meth:`take` would add them one by one (a stack of calls'); returns
        whether it was taken."""
        assert block.dim() == 2 and block.shape[1] == sum(math.prod(s) for s in shapes)
        if not self.accepts(block):
            return False
        self._add(names, shapes, block)
        return True

    def _add(self, names: list[str], shapes: list[torch.Size], block: Tensor) -> None:
        self._like = (block.dtype, block.device, len(block))
        self.names.extend(names)
        self._parts.append(block)  # (n, ΣP)
        self._shapes.extend(shapes)

    def __bool__(self) -> bool:
        return bool(self.names)

    def sq_norms(self) -> Tensor:
        """``(n,)``: each example's squared norm over all the taken gradients."""
        if self._flat is None:
            parts = self._parts
            self._flat = parts[0] if len(parts) == 1 else torch.cat(parts, 1)  # (n, ΣP)
            self._parts = []
        return torch.linalg.vector_norm(self._flat, dim=1).square()  # (n,)

    def weighted_sums(self, coef: Tensor, last: bool = False) -> dict[str, Tensor]:
        """``{name: Σ_i coef_i g_i}``, views of one new buffer; call after :meth:`sq_norms`.
        ``last``: no more sums will be asked for, so the joint lets go of its copy."""
        flat = self._flat
        assert flat is not None, "take the norms first"
        coef = coef if coef.dtype == flat.dtype else coef.to(flat.dtype)
        total = torch.mm(coef[None], flat).view(-1)  # (ΣP,)
        sizes = [math.prod(shape) for shape in self._shapes]
        out = {}
        for name, shape, part in zip(self.names, self._shapes, total.split(sizes), strict=True):
            out[name] = part if len(shape) == 1 else part.view(shape)  # (*shape,)
        if last:
            self._flat = None
        return out
