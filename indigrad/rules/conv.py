"""``nn.Conv{1,2,3}d`` and ``nn.ConvTranspose{1,2,3}d``, batched inputs ``(n, C, *spatial)``.

Both are written as one product per group ``g`` over positions ``P``:

    dW_i[g] = L_i[g] R_i[g]ᵀ                                 einsum("ngap,ngbp->ngab")

    Conv:           L = G                 (n, g, C_out/g, P)       P = output positions
                    R = im2col(x padded)  (n, g, C_in/g·k, P)      weight (C_out, C_in/g, *k)
    ConvTranspose:  L = x                 (n, g, C_in/g, P)        P = input positions
                    R = im2col(G_full)    (n, g, C_out/g·k, P)     weight (C_in, C_out/g, *k)

``im2col(t)[c·k, p] = t[c, p·stride + k·dilation]`` (per spatial dim) is a strided view of
``t``, copied once. The conv sees its input padded exactly as the module pads it (zeros,
"same", or ``F.pad`` with ``padding_mode``), then with padding 0. On CPU a 2-d conv with
symmetric zero padding takes ``F.unfold`` instead, one operation that pads as it copies
(except into the CPU buffer pool's large buffers, which it cannot write). On CUDA, whose
``im2col`` launches one kernel per image, it unfolds the batch taken as one image of
n·C_in channels (the same elements in the same order), where padding is needed.

On a CPU, ``dW_i`` of every example may instead come from one weight gradient
(``convolution_backward``) of a conv with the examples as its groups, the batch taken as one
image of n·C_in channels and the output gradient as one of n·C_out (no im2col), in float32
where the shapes favour oneDNN's grouped kernel (``_by_groups``); and a depthwise conv's
from one convolution of the batch as channels (``_depthwise``).

A transposed conv's output is its "full" output ``full[i·s + k·d] += x[i] W[k]`` cropped
by ``padding`` on both sides and extended by ``output_padding`` at the end, so ``G_full`` is
``G`` padded by ``padding`` on the left and by ``padding - output_padding`` on the right (a
crop when negative): the transposed conv's weight gradient is the conv's, with input and
output gradient swapped.

    grads        dW_i = L_i Rᵢᵀ per group (one bmm)         db_i = Σ_p G_ip    einsum("nop->no")
    sq_norms     ‖dW_i‖² = Σ_g ⟨L_iᵀ L_i, R_iᵀ R_i⟩           (ghost, P×P Grams per group) when
                 P (a + b) < a b, else materialise dW_i        (a, b = the two widths above)
    weighted_sum Σ_i c_i dW_i: one weight gradient of the module (``convolution_backward``) with
                 ``c ⊙ G`` as output gradient, as in the plain backward.

For a clipped sum, ``dW_i`` may instead be materialised once and both the norm and the
weighted sum taken from it (``Σ_i c_i dW_i`` is then a contraction over the examples), by
the cost choice of ``_cost.materialise_to_clip``.

Unbatched inputs ``(C, *spatial)`` are refused with an error.
"""

from __future__ import annotations

import functools
import math
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from .. import _alloc
from . import _cost
from ._ghost import sq_norms as ghost_sq_norms
from .registry import Rule, Stack, register_rule


def _dims(module: _ConvNd) -> int:
    return len(module.kernel_size)


def _check(module: nn.Module, inputs: tuple[Any, ...], G: Any) -> tuple[_ConvNd, Tensor, Tensor]:
    conv = cast(_ConvNd, module)
    x, d = inputs[0], _dims(conv)
    name = type(module).__name__
    if not isinstance(x, Tensor) or x.dim() != d + 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise RuntimeError(
            f"{name}: indigrad needs a batched input (n, C, *spatial) with {d} spatial dims, "
            f"got {shape}. For a single example, add the batch dimension: x.unsqueeze(0)."
        )
    if not isinstance(G, Tensor) or G.dim() != d + 2 or G.shape[0] != x.shape[0]:
        shape = tuple(G.shape) if isinstance(G, Tensor) else type(G).__name__
        raise RuntimeError(
            f"{name}: output gradient {shape} does not match the input {tuple(x.shape)}"
        )
    return conv, x, G


def _pad_list(module: _ConvNd) -> list[int]:
    """The padding the forward applies, in ``F.pad`` order (last dim first, left then right)."""
    if module.padding_mode != "zeros":
        return list(module._reversed_padding_repeated_twice)  # what forward pads with
    padding: Any = module.padding
    if padding == "valid":
        return [0, 0] * _dims(module)
    if padding == "same":
        out: list[int] = []
        for dil, k in zip(reversed(module.dilation), reversed(module.kernel_size), strict=True):
            total = dil * (k - 1)
            out += [total // 2, total - total // 2]  # the extra one on the right, as torch
        return out
    return [p for p in reversed(padding) for _ in range(2)]


def _pad(module: _ConvNd, x: Tensor, pads: list[int] | None = None) -> Tensor:
    """The conv's input as the module's convolution sees it (with padding 0)."""
    pads = _pad_list(module) if pads is None else pads
    if not any(pads):
        return x
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(x, pads, mode=mode)  # (n, C_in, *padded)


# Devices where im2col is copied position by position, kernel offsets innermost, when a
# kernel row is longer than an output row: a CPU copy runs at the length of its innermost
# run, which for a 7×7 depthwise conv on 2×2 outputs took 5.1 ms (runs of 2) against
# 0.8 ms (runs of 7) per call. A GPU's copy does not care.
_BY_POSITION = {"cpu"}


def _by_position(module: _ConvNd, t: Tensor, out: tuple[int, ...]) -> bool:
    return t.device.type in _BY_POSITION and module.kernel_size[-1] > out[-1]


def _im2col(t: Tensor, module: _ConvNd, out: tuple[int, ...]) -> Tensor:
    """``(n·g, C/g·k, P)`` for ``g`` groups, with ``[c·k, p] = t[c, p·stride + k·dilation]``
    (a strided view, copied)."""
    window = _window(
        t.shape,
        t.stride(),
        tuple(module.kernel_size),
        tuple(module.stride),
        tuple(module.dilation),
        out,
    )
    if window is None:  # as_strided must not read past t
        raise _mismatch(module, out, t)
    size, strides, shape = window
    win = t.as_strided(size, strides, t.storage_offset())  # (n, C, *k, *out)
    n, C, g, d = size[0], size[1], module.groups, len(out)
    if _by_position(module, t, out):
        grouped = win.view(n, g, C // g, *size[2:])  # (n, g, C/g, *k, *out)
        ks, ps = range(3, 3 + d), range(3 + d, 3 + 2 * d)
        by_position = grouped.permute(0, 1, *ps, 2, *ks)  # (n, g, *out, C/g, *k)
        cols = _alloc.empty(tuple(by_position.shape), like=t)
        cols.copy_(by_position)
        return cols.view(n * g, shape[2], shape[1] // g).transpose(1, 2)  # (n·g, C/g·k, P)
    if not _alloc.pooled(shape, t):
        cols = win.reshape(shape)  # (n, C·k, P): one copy, or a view where strides allow
    else:
        cols = _alloc.empty(shape, like=t)  # (n, C·k, P)
        cols.view(win.shape).copy_(win)
    return cols.reshape(n * g, shape[1] // g, shape[2])  # (n·g, C/g·k, P), a view


@functools.lru_cache(maxsize=1024)
def _window(
    shape: tuple[int, ...],
    strides: tuple[int, ...],
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
    out: tuple[int, ...],
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, int, int]] | None:
    """The im2col window of a tensor of ``shape`` and ``strides``: the size and strides of
    its ``as_strided`` view ``(n, C, *k, *out)`` and the shape ``(n, C·k, P)`` it is
    copied to; None unless ``out`` is exactly the forward's output size. Cached: the
    same few layer shapes recur every step, and working this out each call took 11 µs
    of a small conv's 120 µs norm on a 2-core CPU (``benchmarks/README.md``)."""
    n, C = shape[:2]
    for size, o, k, s, dil in zip(shape[2:], out, kernel, stride, dilation, strict=True):
        if o != (size - (k - 1) * dil - 1) // s + 1:
            return None
    size_ = (n, C, *kernel, *out)
    strides_ = (
        strides[0],
        strides[1],
        *(a * dil for a, dil in zip(strides[2:], dilation, strict=True)),
        *(a * s for a, s in zip(strides[2:], stride, strict=True)),
    )
    return size_, strides_, (n, C * math.prod(kernel), math.prod(out))


# Devices whose ``F.unfold`` unfolds the batch in one kernel (a CPU's), and those where it
# unfolds the batch taken as one image of n·C_in channels instead: CUDA's launches one
# kernel per image, so one image is one launch, which pads as it copies (one operation
# where padding and the strided copy take two, and the host's dispatch sets the pace).
_BATCHED_UNFOLD = {"cpu"}
_ONE_IMAGE_UNFOLD = {"cuda"}


def _unfold(module: _ConvNd, x: Tensor, out: tuple[int, ...]) -> Tensor:
    """``im2col`` of a conv's input ``x`` (n, C_in, *in): ``(n·g, C_in/g·k, P)``."""
    pads = _pad_list(module)
    symmetric = len(out) == 2 and pads[0] == pads[1] and pads[2] == pads[3]
    batched = x.device.type in _BATCHED_UNFOLD
    one_image = x.device.type in _ONE_IMAGE_UNFOLD and any(pads)  # else a view or one copy
    if symmetric and module.padding_mode == "zeros" and (batched or one_image):
        n, C, P, g = x.shape[0], x.shape[1], math.prod(out), module.groups
        size = (n, C * math.prod(module.kernel_size), P)
        if not (_alloc.pooled(size, x) or _by_position(module, x, out)):
            images = x if batched else x.reshape(1, n * C, *x.shape[2:])  # (1, n·C_in, *in)
            cols = F.unfold(
                images, module.kernel_size, module.dilation, (pads[2], pads[0]), module.stride
            )  # (n, C_in·k, P), or (1, n·C_in·k, P): the same elements in the same order
            if cols.shape[2] != P:
                raise _mismatch(module, out, x)
            return cols.view(n * g, size[1] // g, P)  # (n·g, C_in/g·k, P)
    return _im2col(_pad(module, x, pads), module, out)


def _mismatch(module: _ConvNd, out: tuple[int, ...], t: Tensor) -> RuntimeError:
    return RuntimeError(
        f"{type(module).__name__}: output {out} does not match the input "
        f"{tuple(t.shape)} (padded) under this layer's options"
    )


def _full_pads(module: _ConvNd, x: Tensor, G: Tensor) -> tuple[list[int], list[int]]:
    """For a transposed conv: ``F.pad`` widths turning ``G`` into ``G_full``, and the
    output padding the forward used (also when it came from ``output_size``)."""
    pads: list[int] = []
    output_padding: list[int] = []
    for i, o, k, s, dil, p in zip(
        x.shape[2:],
        G.shape[2:],
        module.kernel_size,
        module.stride,
        module.dilation,
        module.padding,
        strict=True,
    ):
        full = (i - 1) * s + (k - 1) * dil + 1
        if o < full - 2 * p:
            raise RuntimeError(
                f"{type(module).__name__}: output gradient {tuple(G.shape)} is too small "
                f"for the input {tuple(x.shape)}"
            )
        pads = [p, full - p - o, *pads]  # F.pad order: last dim first
        output_padding.append(o - (full - 2 * p))
    return pads, output_padding


def _factors(module: _ConvNd, x: Tensor, G: Tensor) -> tuple[Tensor, Tensor]:
    """``L (n·g, a, P)`` and ``R (n·g, b, P)`` with ``dW_i[g] = L R ᵀ``."""
    n, g = x.shape[0], module.groups
    if module.transposed:
        pads, _ = _full_pads(module, x, G)
        G_full = F.pad(G, [max(q, 0) for q in pads])  # padded first, then cropped:
        if min(pads) < 0:  # F.pad crops first, and fails where the crop exceeds G
            G_full = F.pad(G_full, [min(q, 0) for q in pads])  # (n, C_out, *full)
        R = _im2col(G_full, module, tuple(x.shape[2:]))  # (n·g, C_out/g·k, P)
        L = x.reshape(n, x.shape[1], -1)  # (n, C_in, P)
    else:
        R = _unfold(module, x, tuple(G.shape[2:]))  # (n·g, C_in/g·k, P)
        L = G.reshape(n, G.shape[1], -1)  # (n, C_out, P)
    if g != 1:  # (a view, but each costs the host a call)
        L = L.reshape(n * g, L.shape[1] // g, L.shape[2])  # (n·g, a, P)
    return L, R


def _ghost(P: int, a: int, b: int) -> bool:
    """For the norms alone: two P×P Grams (≈ P²(a + b)) cost less than materialising (≈ P a b)."""
    return _cost.ghost_norm(P, a, b)


def _materialise_to_clip(P: int, a: int, b: int, device: torch.device, held: int) -> bool:
    return _cost.materialise_to_clip(P, a, b, device, held)


def _widths(conv: _ConvNd, x: Tensor, G: Tensor) -> tuple[int, int, int]:
    """``P, a, b`` of :func:`_factors` without building the factors."""
    g, k = conv.groups, math.prod(conv.kernel_size)
    if conv.transposed:
        return math.prod(x.shape[2:]), x.shape[1] // g, G.shape[1] // g * k
    return math.prod(G.shape[2:]), G.shape[1] // g, x.shape[1] // g * k


def conv_materialise(module: nn.Module, inputs: tuple[Any, ...], G: Tensor, clipping: bool) -> bool:
    if not clipping:
        return False
    conv, x, G = _check(module, inputs, G)
    held = (x.numel() + G.numel()) // max(1, x.shape[0])  # per example: x, not im2col(x)
    return _materialise_to_clip(*_widths(conv, x, G), G.device, held)


# Devices where a depthwise conv's per-example gradients come from one convolution rather
# than im2col and a batched product: on a CPU, for ConvNeXt's 7×7 depthwise convs at
# n = 32 (float32), 0.45–1.1 ms against 2.7–3.9 ms per call. Not in float64, whose CPU
# convolution of n·C groups took 16–34 ms against 2.5–4 ms.
_DEPTHWISE_BY_CONV = {"cpu"}
_CONV_FORWARD = (F.conv1d, F.conv2d, F.conv3d)
# a conv's weight gradient, by its overload (calling the op's packet resolves it each time)
_WEIGHT_GRADIENT = torch.ops.aten.convolution_backward.default


def _depthwise(conv: _ConvNd, x: Tensor) -> bool:
    """A grouped conv with one input channel per group (depthwise, with any multiplier),
    on a device where :func:`_depthwise_grads` applies."""
    return (
        not conv.transposed
        and 1 < conv.groups == conv.in_channels
        and x.device.type in _DEPTHWISE_BY_CONV
        and x.dtype != torch.float64
    )


def _depthwise_grads(conv: _ConvNd, x: Tensor, G: Tensor) -> Tensor:
    """``dW_i[o, 0, k] = Σ_p G_i[o, p] x̄_i[o / m, p·stride + k·dilation]`` (x̄ padded, m
    outputs per input channel), for all examples at once: a convolution of x̄, the batch
    as channels, with each example's ``G`` as the kernel of its own group, stride and
    dilation swapped. ``(n, C_out, 1, *k)``."""
    n, C, C_out = x.shape[0], x.shape[1], G.shape[1]
    xp = _pad(conv, x)  # (n, C, *padded)
    conv_nd = _CONV_FORWARD[_dims(conv) - 1]
    W = conv_nd(
        xp.reshape(1, n * C, *xp.shape[2:]),  # (1, n·C, *padded)
        G.reshape(n * C_out, 1, *G.shape[2:]),  # (n·C_out, 1, *out)
        None,
        conv.dilation,  # the kernel offsets step by the dilation
        0,
        conv.stride,  # the positions step by the stride
        n * C,
    )  # (1, n·C_out, ≥ *k)
    k = tuple(conv.kernel_size)
    for dim, size in enumerate(k, 2):  # past k: rows of the padded input a stride skipped
        if W.shape[dim] != size:
            W = W.narrow(dim, 0, size)
    return W.reshape(n, C_out, 1, *k)  # (n, C_out, 1, *k)


# Devices where a conv's per-example weight gradients may come from one weight gradient of
# a conv with the examples as its groups (:func:`_by_groups`).
_BY_GROUPS = {"cpu"}


def _by_groups(conv: _ConvNd, x: Tensor, G: Tensor) -> bool:
    """Whether :func:`_grouped_grads` takes the call's per-example weight gradients: a 2-d
    conv with one group and a kernel larger than 1×1, in float32 on a device of
    ``_BY_GROUPS``, with 16 to 64 input channels, at most 64 output channels and at least
    64 output positions. There, on a 2-core CPU (n = 16 and 64, 8×8 to 32×32 outputs),
    oneDNN's grouped weight gradient took 0.3–0.8× the time of im2col and the batched
    product (2.1 against 4.4 ms for 32 → 64 channels at 16×16, n = 64), its output's page
    faults not counted; at 128 and 256 channels up to 23× below 1024 positions, with 3
    input channels 1.8–3.7× at 32×32, and a 1×1 conv needs no im2col
    (``benchmarks/conv_by_groups.py``)."""
    return (
        x.device.type in _BY_GROUPS
        and x.dtype == torch.float32
        and not conv.transposed
        and conv.groups == 1
        and _dims(conv) == 2
        and math.prod(conv.kernel_size) > 1
        and 16 <= x.shape[1] <= 64
        and G.shape[1] <= 64
        and math.prod(G.shape[2:]) >= 64
    )


def _grouped_grads(conv: _ConvNd, x: Tensor, G: Tensor) -> Tensor:
    """``dW_i`` for all examples from weight gradients of a conv with the examples as its
    groups (:func:`_grouped`). Where the result comes from the buffer pool, it is taken a
    few examples at a time (at most ``_CHUNK_BYTES`` of gradients each) and copied in: the
    weight gradient's own output, a fresh allocation of the C allocator, would be mapped
    page by page each step (a fault per 4 KiB), and a small one is reused from chunk to
    chunk. ``(n, C_out, C_in, *k)``."""
    n = x.shape[0]
    padding, x = _conv_padding(conv, x)
    shape = (n, *conv.weight.shape)
    if not _alloc.pooled(shape, x):
        return _grouped(conv, x, G, padding)
    out = _alloc.empty(shape, like=x)  # (n, C_out, C_in, *k)
    step = max(1, _CHUNK_BYTES // (conv.weight.numel() * x.element_size()))
    for start in range(0, n, step):
        part = slice(start, start + step)
        out[part].copy_(_grouped(conv, x[part], G[part], padding))
    return out


_CHUNK_BYTES = 2 << 20


def _grouped(conv: _ConvNd, x: Tensor, G: Tensor, padding: list[int]) -> Tensor:
    """One weight gradient of a conv with ``m`` groups, the examples of ``x`` (m, C_in,
    *in), padded but for ``padding``: the batch as one image of ``m·C_in`` channels, the
    output gradient as one of ``m·C_out``, so that group ``i``'s weight gradient is example
    ``i``'s. ``(m, C_out, C_in, *k)``."""
    m, C_in, C_out = x.shape[0], x.shape[1], G.shape[1]
    shape = (m * C_out, C_in, *conv.kernel_size)
    weight = _zeros(shape, x)  # its shape only: a weight gradient reads no weight
    _, dW, _ = _WEIGHT_GRADIENT(
        G.reshape(1, m * C_out, *G.shape[2:]),  # (1, m·C_out, *out)
        x.reshape(1, m * C_in, *x.shape[2:]),  # (1, m·C_in, *in)
        weight,
        None,
        list(conv.stride),
        padding,
        list(conv.dilation),
        False,
        [0] * _dims(conv),
        m,
        [False, True, False],
    )  # (m·C_out, C_in, *k)
    return dW.view(m, *conv.weight.shape)  # (m, C_out, C_in, *k)


_ZEROS: dict[tuple[torch.dtype, torch.device], Tensor] = {}


def _zeros(shape: tuple[int, ...], like: Tensor) -> Tensor:
    """A contiguous tensor of zeros of ``shape``, a view of one kept per dtype and device
    (grown as needed): oneDNN copies a weight that is not contiguous, an allocation and a
    fill the size of the result per call."""
    key = (like.dtype, like.device)
    numel = math.prod(shape)
    kept = _ZEROS.get(key)
    if kept is None or kept.numel() < numel:
        kept = _ZEROS[key] = torch.zeros(numel, dtype=like.dtype, device=like.device)
    return kept[:numel].view(shape)


def _conv_padding(conv: _ConvNd, x: Tensor) -> tuple[list[int], Tensor]:
    """The padding to give ``convolution_backward`` for a (not transposed) conv, and its
    input: the module's own where it pads with zeros symmetrically, else none, the input
    padded as the forward pads it."""
    if conv.padding_mode == "zeros" and not isinstance(conv.padding, str):
        return list(conv.padding), x  # symmetric: the conv pads, as in the forward
    return [0] * _dims(conv), _pad(conv, x)  # (n, C_in, *padded)


def conv_grads(module: nn.Module, inputs: tuple[Any, ...], G: Tensor) -> dict[str, Tensor]:
    conv, x, G = _check(module, inputs, G)  # (n, C_in, *in), (n, C_out, *out)
    n = x.shape[0]
    out: dict[str, Tensor] = {}
    if conv.weight.requires_grad and _depthwise(conv, x):
        out["weight"] = _depthwise_grads(conv, x, G)  # (n, C_out, 1, *k)
    elif conv.weight.requires_grad and _by_groups(conv, x, G):
        out["weight"] = _grouped_grads(conv, x, G)  # (n, C_out, C_in, *k)
    elif conv.weight.requires_grad:
        L, R = _factors(conv, x, G)  # (n·g, a, P), (n·g, b, P)
        W = _products(L, R)  # (n·g, a, b)
        out["weight"] = W.view(n, *conv.weight.shape)  # (n, *weight.shape)
    if conv.bias is not None:
        out["bias"] = G.flatten(2).sum(2)  # (n, C_out)
    return out


def conv_sq_norms(module: nn.Module, inputs: tuple[Any, ...], G: Tensor) -> dict[str, Tensor]:
    conv, x, G = _check(module, inputs, G)  # (n, C_in, *in), (n, C_out, *out)
    n = x.shape[0]
    out: dict[str, Tensor] = {}
    if conv.weight.requires_grad and _depthwise(conv, x):
        W = _depthwise_grads(conv, x, G)  # (n, C_out, 1, *k)
        out["weight"] = torch.linalg.vector_norm(W.flatten(1), dim=1).square()  # (n,)
    elif conv.weight.requires_grad and _by_groups(conv, x, G) and not _ghost(*_widths(conv, x, G)):
        W = _grouped_grads(conv, x, G)  # (n, C_out, C_in, *k)
        out["weight"] = torch.linalg.vector_norm(W.flatten(1), dim=1).square()  # (n,)
    elif conv.weight.requires_grad:
        L, R = _factors(conv, x, G)  # (n·g, a, P), (n·g, b, P)
        sq = _product_sq_norms(L, R)  # (n·g,)
        out["weight"] = sq if L.shape[0] == n else sq.view(n, -1).sum(1)  # (n,): Σ over groups
    if conv.bias is not None and conv.bias.requires_grad:
        out["bias"] = G.flatten(2).sum(2).square().sum(1)  # (n,)
    return out


def _product_sq_norms(L: Tensor, R: Tensor) -> Tensor:
    """``‖L_j R_jᵀ‖²`` for each of the batched products ``(m, a, P) × (m, b, P)``: ``(m,)``,
    from the P×P Grams or from the products themselves, whichever costs less."""
    a, P = L.shape[1:]
    if _ghost(P, a, R.shape[1]):  # the P×P Grams of the positions
        return ghost_sq_norms(L, R)  # (m,)
    W = _products(L, R)  # (m, a, b)
    return torch.linalg.vector_norm(W, dim=(1, 2)).square()  # (m,)


# Devices where a product whose width b is ragged (not a multiple of 16) and a is not
# takes b as its rows (:func:`_products`).
_RAGGED_ROWS = {"cpu"}


def _products(L: Tensor, R: Tensor) -> Tensor:
    """``L_j R_jᵀ`` for the batched factors ``(m, a, P)`` and ``(m, b, P)``: ``(m, a, b)``.
    Where ``b`` is ragged and ``a`` a multiple of 16 (a first layer's 3·k² input columns
    against its channels), as ``(R_j L_jᵀ)ᵀ``, copied, in float32 on a CPU: MKL's batched
    product took 0.6–0.8× the time, the copy included, with the ragged width as the rows
    (b = 27; a = 16 to 64; P = 256 to 4096; n = 16 and 64), 0.9–1.0× at b = 147."""
    if _ragged_rows(L, R):
        out = _alloc.empty((L.shape[0], L.shape[1], R.shape[1]), like=L)  # (m, a, b)
        return out.copy_(_alloc.bmm(R, L.transpose(1, 2)).transpose(1, 2))  # from (m, b, a)
    return _alloc.bmm(L, R.transpose(1, 2))  # (m, a, b)


def _ragged_rows(L: Tensor, R: Tensor) -> bool:
    """Whether :func:`_products` takes ``R``'s width as the rows."""
    a, b = L.shape[1], R.shape[1]
    return bool(
        b % 16 and not a % 16 and L.dtype == torch.float32 and L.device.type in _RAGGED_ROWS
    )


def conv_weighted_sum(
    module: nn.Module, inputs: tuple[Any, ...], G: Tensor, coef: Tensor
) -> dict[str, Tensor]:
    conv, x, G = _check(module, inputs, G)  # (n, C_in, *in), (n, C_out, *out)
    Gc = G * coef.to(G.dtype).view(-1, *[1] * (G.dim() - 1))  # (n, C_out, *out)
    d = _dims(conv)
    output_padding = [0] * d
    if conv.transposed:
        padding = list(cast(tuple[int, ...], conv.padding))
        _, output_padding = _full_pads(conv, x, G)
    else:
        padding, x = _conv_padding(conv, x)  # x: (n, C_in, *padded) where not the conv pads
    has_bias = conv.bias is not None and conv.bias.requires_grad
    _, dW, db = _WEIGHT_GRADIENT(
        Gc,
        x,
        conv.weight,
        [conv.out_channels] if has_bias else None,
        list(conv.stride),
        padding,
        list(conv.dilation),
        conv.transposed,
        output_padding,
        conv.groups,
        [False, bool(conv.weight.requires_grad), has_bias],
    )  # dW (*weight.shape), db (C_out,)
    out: dict[str, Tensor] = {}
    if dW is not None:
        out["weight"] = dW
    if has_bias:
        out["bias"] = db
    return out


# -- stacks: same-shaped calls taken together ----------------------------------------------

# Devices where calls of the same shape take their norms and weighted sums together (a
# GPU, whose step on small images is bound by the host issuing kernels: one call's
# norms and sum take about 7 of them).
_STACKED = {"cuda"}


def stack_key(module: nn.Module, inputs: tuple[Any, ...], G: Any) -> tuple[Any, ...] | None:
    """What calls must share to be stacked (:func:`stacked_sq_norms`), or None for one
    that cannot be: a conv with one group, zero padding given as numbers, and the same
    shapes, options and trainable parameters as the others."""
    conv, x, G = _check(module, inputs, G)
    if (
        x.device.type not in _STACKED
        or conv.transposed
        or conv.groups != 1
        or conv.padding_mode != "zeros"
        or isinstance(conv.padding, str)
        or not conv.weight.requires_grad
    ):
        return None
    bias = conv.bias is not None and conv.bias.requires_grad
    return (
        type(conv),
        x.shape,
        G.shape,
        x.dtype,
        G.dtype,
        x.device,
        tuple(conv.kernel_size),
        tuple(conv.stride),
        tuple(conv.padding),
        tuple(conv.dilation),
        bias,
    )


def stack_elements(module: nn.Module, inputs: tuple[Any, ...], G: Tensor) -> int:
    """The elements of one call's im2col, the largest tensor its norms make (a stack of
    ``k`` calls makes one of ``k`` times that)."""
    x, k = inputs[0], math.prod(cast(_ConvNd, module).kernel_size)
    return x.shape[0] * x.shape[1] * k * math.prod(G.shape[2:])


def stacked_sq_norms(
    modules: list[nn.Module], inputs: list[tuple[Any, ...]], Gs: list[Tensor]
) -> list[dict[str, Tensor]]:
    """:func:`conv_sq_norms` of ``k`` calls with one :func:`stack_key`, in one go: their
    inputs side by side as channels, ``(n, k·C_in, *in)``, whose im2col holds each call's
    own as a block of rows, so that the batched products run over ``n·k``."""
    conv = cast(_ConvNd, modules[0])
    k, n = len(modules), Gs[0].shape[0]
    X = torch.cat([i[0] for i in inputs], 1)  # (n, k·C_in, *in)
    G = torch.cat(Gs, 1)  # (n, k·C_out, *out)
    R = _unfold(conv, X, tuple(G.shape[2:]))  # (n, k·C_in·kk, P)
    R = R.reshape(n * k, R.shape[1] // k, R.shape[2])  # (n·k, C_in·kk, P), a view
    L = G.view(n * k, G.shape[1] // k, -1)  # (n·k, C_out, P)
    weight = _product_sq_norms(L, R).view(n, k)  # (n, k)
    bias = None
    if conv.bias is not None and conv.bias.requires_grad:
        bias = G.flatten(2).sum(2).square().view(n, k, -1).sum(2)  # (n, k)
    out = []
    for j in range(k):
        sq = {"weight": weight[:, j]}  # (n,)
        if bias is not None:
            sq["bias"] = bias[:, j]
        out.append(sq)
    return out


def stacked_weighted_sums(
    modules: list[nn.Module], inputs: list[tuple[Any, ...]], Gs: list[Tensor], coef: Tensor
) -> list[dict[str, Tensor]]:
    """:func:`conv_weighted_sum` of ``k`` calls with one :func:`stack_key`, in one go: one
    weight gradient of a conv with ``k`` groups, the calls' inputs and scaled output
    gradients side by side as its groups' channels."""
    conv = cast(_ConvNd, modules[0])
    k = len(modules)
    X = torch.cat([i[0] for i in inputs], 1)  # (n, k·C_in, *in)
    G = torch.cat(Gs, 1)  # (n, k·C_out, *out)
    G.mul_(coef.to(G.dtype).view(-1, *[1] * (G.dim() - 1)))  # c ⊙ G, in the new copy
    has_bias = conv.bias is not None and conv.bias.requires_grad
    _, dW, db = _WEIGHT_GRADIENT(
        G,
        X,
        _stacked_weight(conv.weight, k),
        [k * conv.out_channels] if has_bias else None,
        list(conv.stride),
        list(conv.padding),
        list(conv.dilation),
        False,
        [0] * _dims(conv),
        k,
        [False, True, has_bias],
    )  # dW (k·C_out, C_in, *kk), db (k·C_out,)
    out = []
    for j, W in enumerate(dW.chunk(k)):
        sums = {"weight": W}  # (C_out, C_in, *kk)
        if has_bias:
            sums["bias"] = db[j * conv.out_channels : (j + 1) * conv.out_channels]
        out.append(sums)
    return out


def _stacked_weight(weight: Tensor, k: int) -> Tensor:
    """A tensor of the stacked conv's weight shape, ``(k·C_out, C_in, *kk)``: the weight
    gradient reads only its shape (left unfilled, which saves a kernel, and not kept: a
    kept one per shape would hold k times a large conv's weight for good)."""
    return weight.new_empty((k * weight.shape[0], *weight.shape[1:]))


CONV_RULE = Rule(
    conv_grads,
    conv_sq_norms,
    conv_weighted_sum,
    materialise=conv_materialise,
    stack=Stack(stack_key, stack_elements, stacked_sq_norms, stacked_weighted_sums),
)
CONV = {
    cls: register_rule(cls, CONV_RULE)
    for cls in (
        nn.Conv1d,
        nn.Conv2d,
        nn.Conv3d,
        nn.ConvTranspose1d,
        nn.ConvTranspose2d,
        nn.ConvTranspose3d,
    )
}
