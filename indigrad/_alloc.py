"""Output buffers for materialised per-example gradients, reused from step to step.

A fresh CPU allocation of megabytes is mapped page by page on first write: on a 2-core
machine, zero-filling 256 × 400k floats costs ~200 ms of page faults against ~20 ms of
writing, and the C allocator returns large freed blocks to the OS, so every training step
pays the faults again. Two remedies, for CPU buffers of at least ``_MIN_BYTES``:

- **Huge pages.** Each buffer is its own anonymous mapping with ``madvise(MADV_HUGEPAGE)``
  (what PyTorch's ``THP_MEM_ALLOC_ENABLE=1`` asks for every allocation), which cuts the
  faults 512-fold where the OS allows it.
- **Reuse.** A buffer returns to a pool when nothing references it any more: tensors
  made by ``torch.frombuffer`` keep the mapping alive, so a mapping that only the pool
  holds is free, and the next request of a similar size takes it instead of mapping new
  memory. A result the caller still holds is never handed out again. The pool unmaps
  its least recently used free buffers so as to hold at most twice the most it ever
  had in use at once.

Elsewhere (CUDA, small buffers, platforms without ``mmap``) buffers are ordinary tensors.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import sys
import threading

import torch
from torch import Tensor

_HUGE = 2 << 20  # 2 MiB, the x86-64 / aarch64 huge page
_MIN_BYTES = 1 << 20
_SLACK = 2  # a free buffer serves requests down to 1/_SLACK of its size


class _Buffer:
    __slots__ = ("last_use", "mem", "nbytes", "offset")

    def __init__(self, nbytes: int, tick: int) -> None:
        # one huge page more, so that the buffer can start on a huge-page boundary
        self.mem = mmap.mmap(-1, nbytes + _HUGE)
        start = torch.frombuffer(self.mem, dtype=torch.uint8, count=1).data_ptr()
        self.offset = -start % _HUGE
        if sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE"):
            with contextlib.suppress(OSError):  # THP disabled: ordinary pages
                self.mem.madvise(mmap.MADV_HUGEPAGE)
        self.nbytes = nbytes
        self.last_use = tick

    def free(self) -> bool:
        # one reference from this object, one for getrefcount's argument; every tensor
        # (and view, storage, array) made from the buffer holds one more
        return sys.getrefcount(self.mem) <= 2


class _Pool:
    def __init__(self) -> None:
        self._buffers: list[_Buffer] = []
        self._lock = threading.Lock()
        self._tick = 0
        self._peak = 0  # the most bytes in use at once

    def take(self, nbytes: int) -> tuple[mmap.mmap, int]:
        nbytes = -(-nbytes // _HUGE) * _HUGE  # whole huge pages
        with self._lock:
            self._tick += 1
            free = [b for b in self._buffers if b.free()]
            fits = [b for b in free if nbytes <= b.nbytes <= _SLACK * nbytes]
            if fits:
                buf = min(fits, key=lambda b: b.nbytes)
                free.remove(buf)
            else:
                buf = _Buffer(nbytes, self._tick)
                self._buffers.append(buf)
            buf.last_use = self._tick
            in_use = sum(b.nbytes for b in self._buffers) - sum(b.nbytes for b in free)
            self._peak = max(self._peak, in_use)
            kept = sum(b.nbytes for b in free)
            for old in sorted(free, key=lambda b: b.last_use):  # least recently used first
                if kept <= self._peak:
                    break
                self._buffers.remove(old)  # unmapped once garbage
                kept -= old.nbytes
            return buf.mem, buf.offset

    def clear(self) -> None:
        """Forget every buffer; those still in use stay valid until they are dropped."""
        with self._lock:
            self._buffers.clear()
            self._peak = 0


_POOL = _Pool()


def pooled(shape: tuple[int, ...], like: Tensor) -> bool:
    """Whether :func:`empty` takes a buffer of this shape from the pool."""
    return like.device.type == "cpu" and math.prod(shape) * like.element_size() >= _MIN_BYTES


def empty(shape: tuple[int, ...], like: Tensor) -> Tensor:
    """An uninitialised tensor of ``shape`` with ``like``'s dtype and device; large CPU
    buffers come from the pool (huge pages, reused once the caller drops them)."""
    if not pooled(shape, like):
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    numel = math.prod(shape)
    mem, offset = _POOL.take(numel * like.element_size())
    return torch.frombuffer(mem, dtype=like.dtype, count=numel, offset=offset).view(shape)


def bmm(a: Tensor, b: Tensor) -> Tensor:
    """``torch.bmm(a, b)`` ``(m, i, k) @ (m, k, j)``, written into a buffer from the pool
    where :func:`empty` takes one; elsewhere (a GPU) one operation, where an allocation
    and a product into it are two dispatches for the host."""
    shape = (a.shape[0], a.shape[1], b.shape[2])  # (m, i, j)
    if not pooled(shape, a):
        return torch.bmm(a, b)
    return torch.bmm(a, b, out=empty(shape, like=a))
