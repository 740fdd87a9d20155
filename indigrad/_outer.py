"""Per-example outer products ``W_i = L_i ⊗ R_i`` written at the GPU's write bandwidth.

A Linear layer on unbatched features (``T = 1``) has per-example weight gradients
``dW_i = G_i ⊗ A_i``: ``n·a·b`` numbers written from ``n·(a + b)`` read. Writing them is
the whole cost, and PyTorch's own ways write slowly: a broadcast ``torch.mul`` at 1.7 TB/s
and a K = 1 ``torch.bmm`` at 2.6 TB/s on an H200 whose plain fill writes 4.7 TB/s
(``benchmarks/gpu_check.py``). The Triton kernel here reads each example's two vectors
once per tile and only writes.

It is taken on CUDA tensors where Triton imports (it ships with PyTorch's CUDA builds);
elsewhere :func:`outer` returns ``False`` and the caller writes the product itself (also,
with a warning, from the first time the kernel fails to compile or launch). The
product is one multiplication per element, as in ``torch.mul``: the result is the same to
the bit.

    >>> import torch
    >>> outer(torch.randn(2, 3), torch.randn(2, 4), torch.empty(2, 3, 4))  # CPU: not taken
    False
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

from torch import Tensor

# tile of W one program writes: rows of L × columns of R (32 × 256 floats: 32 KB)
_BLOCK_A, _BLOCK_B, _WARPS = 32, 256, 8
_MAX_EXAMPLES = 65535  # the grid's second axis
DEVICES = {"cuda"}  # where it is tried (the tests add "cpu" under Triton's interpreter)
_failed: list[Exception] = []  # a compile or launch that failed: not tried again


@functools.cache
def _kernel() -> Any:
    """The compiled-on-first-use kernel, or None where Triton does not import."""
    try:
        import triton
        import triton.language as tl
    except Exception:  # not installed, or installed without a working backend
        return None

    @triton.jit
    def outer_kernel(L, R, W, a, b, tiles_b, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr):
        tile = tl.program_id(0)
        i = tl.program_id(1).to(tl.int64)  # the example; W's offsets pass 2³¹
        rows = (tile // tiles_b) * BLOCK_A + tl.arange(0, BLOCK_A)  # (BLOCK_A,)
        cols = (tile % tiles_b) * BLOCK_B + tl.arange(0, BLOCK_B)  # (BLOCK_B,)
        left = tl.load(L + i * a + rows, mask=rows < a, other=0.0)  # (BLOCK_A,)
        right = tl.load(R + i * b + cols, mask=cols < b, other=0.0)  # (BLOCK_B,)
        offsets = i * a * b + rows[:, None] * b + cols[None, :]  # (BLOCK_A, BLOCK_B)
        mask = (rows[:, None] < a) & (cols[None, :] < b)
        tl.store(W + offsets, left[:, None] * right[None, :], mask=mask)

    return triton, outer_kernel


def outer(L: Tensor, R: Tensor, out: Tensor) -> bool:
    """Write ``out[i] = L[i] ⊗ R[i]`` for ``L`` (n, a), ``R`` (n, b), ``out`` (n, a, b),
    all contiguous, of one dtype, on one CUDA device. Returns ``False``, having written
    nothing, where the kernel does not apply (not CUDA, no Triton, other layouts)."""
    n, a = L.shape
    b = R.shape[1]
    if not (
        L.device.type in DEVICES
        and 0 < n <= _MAX_EXAMPLES
        and L.dtype == R.dtype == out.dtype
        and L.device == R.device == out.device
        and L.is_contiguous()
        and R.is_contiguous()
        and out.is_contiguous()
        and out.shape == (n, a, b)
    ):
        return False
    compiled = _kernel()
    if compiled is None or _failed:
        return False
    triton, kernel = compiled
    tiles_b = triton.cdiv(b, _BLOCK_B)
    grid = (triton.cdiv(a, _BLOCK_A) * tiles_b, n)
    try:
        kernel[grid](L, R, out, a, b, tiles_b, BLOCK_A=_BLOCK_A, BLOCK_B=_BLOCK_B, num_warps=_WARPS)
    except Exception as err:  # it does not compile or launch here: the caller's way, always
        _failed.append(err)
        warnings.warn(
            f"indigrad: the Triton outer-product kernel failed ({type(err).__name__}: "
            f"{err}); per-example gradients are written by torch.bmm from now on, slower "
            "but the same",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True
