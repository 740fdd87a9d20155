"""``nn.Embedding`` and ``nn.EmbeddingBag``: rows of ``W`` (V, d) looked up by integer ids.

``nn.Embedding`` on ids ``(n, *)``, flattened to ``T`` lookups per example, ``G`` (n, T, d):

    grads        dW_i[v] = Σ_{t: id_it = v} G_it            index_add into one (n·V, d) buffer
    sq_norms     ‖dW_i‖² = Σ_v ‖Σ_{t: id_it = v} G_it‖²
                         = Σ_{t,s} [id_it = id_is] ⟨G_it, G_is⟩
                 T×T masked Gram, bmm("ntd,nsd->nts") (n·T²·d), when T ≤ _GRAM_MAX_T,
                 else sort the keys (i, id), sum G over runs of equal keys, square (n·T·d)
    weighted_sum Σ_i c_i dW_i = index_add of c_i G_it into row id_it    (V, d)

Ids shared by the batch (a position embedding of ``arange(T)``, expanded to the batch by
indigrad) group the lookups once for all examples: the squared norms sum ``G`` over runs
of equal ids (n·T·d), and the weighted sum scatters ``Σ_i c_i G_i`` (T rows).

``nn.EmbeddingBag``: bag ``b`` (one example) holds entries ``j`` with ids ``id_j``, weights
``a_j`` (``per_sample_weights``; for "mean" 1 / the bag's number of non-padding entries; 1
otherwise; 0 for padding entries) and ``G_b`` (n, d):

    sum, mean    dW_b[v] = (Σ_{j ∈ b, id_j = v} a_j) G_b = c_bv G_b
                 ‖dW_b‖² = ‖G_b‖² Σ_v c_bv²                           (never materialised)
                 Σ_b c_b dW_b = index_add of c_b a_j G_b into row id_j
    max          dW_b[v, k] = G_bk [v = argmax_j W[id_j, k]]  (the forward's argmax, recomputed)
                 ‖dW_b‖² = Σ_k G_bk² over non-empty bags

Options, as the per-example reference (one forward and backward per example) sees them:
``padding_idx`` rows get no gradient (and padding entries leave a bag); ``max_norm``
renormalises rows in place before the lookup, outside autograd, so the gradient is the
same scatter; ``sparse=True`` still gives dense per-example results. Embedding's
``scale_grad_by_freq`` divides ``G_it`` by the count of ``id_it`` *within example i* (the
per-example loop runs each example alone), so ``Σ_i dW_i`` is not the batch gradient, whose
counts run over the whole batch. EmbeddingBag's ``scale_grad_by_freq`` is refused: PyTorch's
CPU kernel (torch 2.13) divides by the count of another id than the one it scales.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn

from .. import _alloc
from . import _ghost
from .registry import register_rule

# Up to this many lookups per example, sq_norms uses the masked T×T Gram (one bmm), beyond
# it the sort and segment sum, whose cost grows as T instead of T². Both costs scale with d,
# so T alone decides; on a CPU the two break even near T = 32-64 for d from 64 to 768.
_GRAM_MAX_T = 32


def _counts(keys: Tensor) -> Tensor:
    """``count[j]``: how often ``keys[j]`` occurs in ``keys`` (any shape)."""
    slot, _ = _runs(keys.reshape(-1))  # (N,)
    runs = torch.zeros_like(slot).index_add_(0, slot, torch.ones_like(slot))  # (N,) run sizes
    return runs[slot].view(keys.shape)


# -- nn.Embedding ---------------------------------------------------------------------------


def _embedding_flat(module: nn.Module, inputs: tuple[Any, ...], G: Tensor) -> tuple[Tensor, Tensor]:
    """Ids ``(n, T)`` (int64) and ``G`` ``(n, T, d)``, scaled by ``1 / count`` under
    ``scale_grad_by_freq``."""
    emb = cast(nn.Embedding, module)
    ids = inputs[0]  # (n, *)
    if ids.shape != G.shape[:-1]:
        raise RuntimeError(
            f"{type(module).__name__}: ids {tuple(ids.shape)} and output gradient "
            f"{tuple(G.shape)} disagree on their batch and extra dims"
        )
    n, V, d = ids.shape[0], emb.num_embeddings, G.shape[-1]
    ids = ids.reshape(n, -1).long()  # (n, T)
    G = G.reshape(n, ids.shape[1], d)  # (n, T, d)
    if emb.scale_grad_by_freq:
        rows = torch.arange(n, device=ids.device)[:, None]  # (n, 1)
        counts = _counts(rows * V + ids)  # (n, T), within each example
        G = G / counts.to(G.dtype)[:, :, None]  # (n, T, d)
    return ids, G


def embedding_grads(module: nn.Module, inputs: tuple[Any, ...], G: Tensor) -> dict[str, Tensor]:
    emb = cast(nn.Embedding, module)
    if not emb.weight.requires_grad:
        return {}
    ids, G = _embedding_flat(module, inputs, G)  # (n, T), (n, T, d)
    n, T, d = G.shape
    V = emb.num_embeddings
    W = _alloc.empty((n, V, d), like=G).zero_()  # (n, V, d)
    keys = (torch.arange(n, device=ids.device)[:, None] * V + ids).reshape(n * T)  # (n T,)
    W.view(n * V, d).index_add_(0, keys, G.reshape(n * T, d))  # rows (i, id_it) += G_it
    if emb.padding_idx is not None:
        W[:, emb.padding_idx] = 0  # (n, d)
    return {"weight": W}


def _shared(ids: Tensor) -> bool:
    """Whether every example looks up the same ids: ``(n, T)`` expanded from one row, as
    indigrad expands a position embedding's ``arange(T)`` to the batch."""
    return ids.shape[0] > 1 and ids.stride(0) == 0


def _runs(keys: Tensor) -> tuple[Tensor, Tensor]:
    """For ``keys`` (N,): the run of equal keys each belongs to (runs numbered in sorted
    order) and each run's key (0 past the last run). Sizes stay N (no ``torch.unique``),
    so that no step waits for the device to report how many distinct keys there are."""
    ordered, order = keys.sort()  # (N,), (N,)
    starts = torch.ones_like(ordered, dtype=torch.bool)  # (N,) a run starts here
    starts[1:] = ordered[1:] != ordered[:-1]
    run = starts.cumsum(0) - 1  # (N,) run of each sorted key
    slot = torch.empty_like(run).scatter_(0, order, run)  # (N,) run of each key
    key = torch.zeros_like(ordered).scatter_(0, run, ordered)  # (N,) each run's key
    return slot, key


def _segment_sq_norms(ids: Tensor, G: Tensor, V: int, pad: int | None) -> Tensor:
    """``(n,)``: ``Σ_v ‖Σ_{t: id_it = v} G_it‖²`` by summing ``G`` over each run of equal
    keys ``(i, id)`` (of equal ids, where all examples share them)."""
    n, T, d = G.shape
    if _shared(ids):  # one set of runs for the whole batch
        slot, key = _runs(ids[0])  # (T,), (T,)
        S = G.new_zeros(n, T, d).index_add_(1, slot, G)  # (n, T, d) run sums
        s = S.square().sum(2)  # (n, T), 0 past the last run
        if pad is not None:
            s = s * (key != pad)  # (n, T)
        return s.sum(1)  # (n,)
    keys = (torch.arange(n, device=ids.device)[:, None] * V + ids).reshape(n * T)  # (n T,)
    slot, key = _runs(keys)  # (n T,), (n T,)
    S = G.new_zeros(n * T, d).index_add_(0, slot, G.reshape(n * T, d))  # (n T, d) run sums
    s = S.square().sum(1)  # (n T,), 0 past the last run
    if pad is not None:
        s = s * (key % V != pad)  # (n T,)
    return G.new_zeros(n).index_add_(0, key // V, s)  # (n,)


def embedding_sq_norms(module: nn.Module, inputs: tuple[Any, ...], G: Tensor) -> dict[str, Tensor]:
    emb = cast(nn.Embedding, module)
    if not emb.weight.requires_grad:
        return {}
    ids, G = _embedding_flat(module, inputs, G)  # (n, T), (n, T, d)
    T = G.shape[1]
    V, pad = emb.num_embeddings, emb.padding_idx
    if T == 1:
        sq = G.square().sum((1, 2))  # (n,)
        if pad is not None:
            sq = sq * (ids[:, 0] != pad)  # (n,)
    elif T <= _GRAM_MAX_T and not _shared(ids):  # masked Gram
        same = ids[:, :, None] == ids[:, None, :]  # (n, T, T)
        if pad is not None:
            same &= (ids != pad)[:, :, None]  # (n, T, T)
        (G2,) = _ghost.operands(G)  # float64 where float32 products are lowered
        GG = torch.bmm(G2, G2.transpose(1, 2))  # (n, T, T)
        sq = _ghost.guarded_sum(GG.mul_(same), G.shape[2], 0).to(G.dtype)  # (n,)
    else:  # sort the keys (i, id), sum G over runs of equal keys
        sq = _segment_sq_norms(ids, G, V, pad)  # (n,)
    return {"weight": sq}


def embedding_weighted_sum(
    module: nn.Module, inputs: tuple[Any, ...], G: Tensor, coef: Tensor
) -> dict[str, Tensor]:
    emb = cast(nn.Embedding, module)
    if not emb.weight.requires_grad:
        return {}
    ids, G = _embedding_flat(module, inputs, G)  # (n, T), (n, T, d)
    n, T, d = G.shape
    c = coef.to(G.dtype)  # (n,)
    out = G.new_zeros(emb.num_embeddings, d)  # (V, d)
    if _shared(ids):  # Σ_i c_i G_i first, then one scatter of T rows
        out.index_add_(0, ids[0], torch.mm(c[None], G.reshape(n, T * d)).view(T, d))
    else:
        out.index_add_(0, ids.reshape(n * T), (G * c[:, None, None]).reshape(n * T, d))
    if emb.padding_idx is not None:
        out[emb.padding_idx] = 0  # (d,)
    return {"weight": out}  # (V, d)


# -- nn.EmbeddingBag ------------------------------------------------------------------------


def _bags(module: nn.Module, inputs: tuple[Any, ...], G: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each entry's id ``(N,)`` and bag ``(N,)`` (int64), and the offsets the forward used
    (``(n,)``, or ``(n + 1,)`` with ``include_last_offset``). ``n = G.shape[0]`` bags."""
    bag_mod = cast(nn.EmbeddingBag, module)
    name = type(module).__name__
    if bag_mod.scale_grad_by_freq:
        raise RuntimeError(
            f"{name} with scale_grad_by_freq=True is not supported: PyTorch's embedding_bag "
            "backward (CPU, torch 2.13) does not divide each row by its own frequency, so "
            "no per-example rule can match it. Use scale_grad_by_freq=False, or nn.Embedding "
            "(whose scale_grad_by_freq is supported) followed by a sum or mean over the bag."
        )
    ids = inputs[0]
    offsets = inputs[1] if len(inputs) > 1 else None
    if G.dim() != 2:
        raise RuntimeError(f"{name}: expected an output gradient (bags, d), got {tuple(G.shape)}")
    n = G.shape[0]
    if ids.dim() == 2:  # (n, L): one bag per row
        L = ids.shape[1]
        if ids.shape[0] != n or offsets is not None:
            raise RuntimeError(
                f"{name}: ids {tuple(ids.shape)} do not match the output gradient {tuple(G.shape)}"
            )
        bag = torch.arange(n, device=ids.device).repeat_interleave(L)  # (n L,)
        offsets = torch.arange(0, n * L, L, dtype=ids.dtype, device=ids.device)  # (n,)
        return ids.reshape(n * L).long(), bag, offsets
    if ids.dim() != 1 or offsets is None or offsets.dim() != 1:
        raise RuntimeError(
            f"{name}: expected ids (n, L), or ids (N,) with offsets (n,); got ids "
            f"{tuple(ids.shape)} and offsets {None if offsets is None else tuple(offsets.shape)}"
        )
    N = ids.shape[0]
    starts = offsets[:-1] if bag_mod.include_last_offset else offsets  # (n,)
    if starts.shape[0] != n:
        raise RuntimeError(
            f"{name}: offsets {tuple(offsets.shape)} (include_last_offset="
            f"{bag_mod.include_last_offset}) give {starts.shape[0]} bags, but the output "
            f"gradient has {n}"
        )
    if n > 1 and bool((starts[1:] < starts[:-1]).any()):
        raise RuntimeError(f"{name}: offsets must be non-decreasing, got {offsets.tolist()}")
    if bag_mod.include_last_offset and int(offsets[-1]) != N:
        raise RuntimeError(
            f"{name}: with include_last_offset=True the last offset must be the length of "
            f"the input ({N}), got {int(offsets[-1])}; which bag the entries after it belong "
            "to is not defined the same way on every device"
        )
    positions = torch.arange(N, device=ids.device, dtype=starts.dtype)  # (N,)
    bag = torch.searchsorted(starts, positions, right=True) - 1  # (N,)
    return ids.long(), bag.long(), offsets


def _bag_weights(
    module: nn.Module, inputs: tuple[Any, ...], ids: Tensor, bag: Tensor, G: Tensor
) -> Tensor:
    """``a_j`` (N,): the factor of ``G_{bag_j}`` in row ``id_j`` ("sum" and "mean")."""
    bag_mod = cast(nn.EmbeddingBag, module)
    n, pad = G.shape[0], bag_mod.padding_idx
    psw = inputs[2] if len(inputs) > 2 else None
    a = torch.ones_like(ids, dtype=G.dtype) if psw is None else psw.reshape(-1).to(G.dtype)  # (N,)
    if pad is not None:
        a = a * (ids != pad)  # (N,)
    if bag_mod.mode == "mean":
        valid = torch.ones_like(a) if pad is None else (ids != pad).to(G.dtype)  # (N,)
        size = G.new_zeros(n).index_add_(0, bag, valid)  # (n,)
        a = a / size.clamp(min=1)[bag]  # (N,)
    return a


def _bag_argmax(module: nn.Module, inputs: tuple[Any, ...], G: Tensor) -> tuple[Tensor, Tensor]:
    """For "max": the row ``(n, d)`` each output entry came from, and which bags are
    non-empty ``(n,)``, recomputed by the forward's own kernel (same choice among ties)."""
    bag_mod = cast(nn.EmbeddingBag, module)
    ids, _bag, offsets = _bags(module, inputs, G)
    pad = -1 if bag_mod.padding_idx is None else bag_mod.padding_idx
    _, _, size, argmax = torch.ops.aten._embedding_bag(
        bag_mod.weight.detach(),  # (V, d), already renormalised if max_norm is set
        ids,  # (N,)
        offsets.long(),  # (n,) or (n + 1,)
        mode=2,  # max
        include_last_offset=bag_mod.include_last_offset,
        padding_idx=pad,
    )  # size (n,) entries that are not padding, argmax (n, d) ids
    return argmax.long(), size > 0


def embedding_bag_grads(module: nn.Module, inputs: tuple[Any, ...], G: Tensor) -> dict[str, Tensor]:
    bag_mod = cast(nn.EmbeddingBag, module)
    if not bag_mod.weight.requires_grad:
        return {}
    n, d = G.shape
    V = bag_mod.num_embeddings
    W = _alloc.empty((n, V, d), like=G).zero_()  # (n, V, d)
    if bag_mod.mode == "max":
        argmax, nonempty = _bag_argmax(module, inputs, G)  # (n, d), (n,)
        Gm = G * nonempty[:, None]  # (n, d)
        W.scatter_add_(1, argmax[:, None, :], Gm[:, None, :])  # W[b, argmax_bk, k] += G_bk
        return {"weight": W}
    ids, bag, _ = _bags(module, inputs, G)  # (N,), (N,)
    a = _bag_weights(module, inputs, ids, bag, G)  # (N,)
    W.view(n * V, d).index_add_(0, bag * V + ids, a[:, None] * G[bag])  # rows (b, id_j) += a_j G_b
    return {"weight": W}


def embedding_bag_sq_norms(
    module: nn.Module, inputs: tuple[Any, ...], G: Tensor
) -> dict[str, Tensor]:
    bag_mod = cast(nn.EmbeddingBag, module)
    if not bag_mod.weight.requires_grad:
        return {}
    n = G.shape[0]
    if bag_mod.mode == "max":
        _, nonempty = _bag_argmax(module, inputs, G)  # (n,)
        return {"weight": G.square().sum(1) * nonempty}  # (n,)
    V = bag_mod.num_embeddings
    ids, bag, _ = _bags(module, inputs, G)  # (N,), (N,)
    a = _bag_weights(module, inputs, ids, bag, G)  # (N,)
    slot, key = _runs(bag * V + ids)  # (N,) run of equal (b, id) of each entry, run's key
    c = G.new_zeros(slot.shape[0]).index_add_(0, slot, a)  # (N,) c_bv per run, 0 past the last
    cc = G.new_zeros(n).index_add_(0, key // V, c.square())  # (n,) Σ_v c_bv²
    return {"weight": G.square().sum(1) * cc}  # (n,)


def embedding_bag_weighted_sum(
    module: nn.Module, inputs: tuple[Any, ...], G: Tensor, coef: Tensor
) -> dict[str, Tensor]:
    bag_mod = cast(nn.EmbeddingBag, module)
    if not bag_mod.weight.requires_grad:
        return {}
    d = G.shape[1]
    V = bag_mod.num_embeddings
    coef = coef.to(G.dtype)  # (n,)
    out = G.new_zeros(V, d)  # (V, d)
    if bag_mod.mode == "max":
        argmax, nonempty = _bag_argmax(module, inputs, G)  # (n, d), (n,)
        Gc = G * (coef * nonempty)[:, None]  # (n, d)
        cols = torch.arange(d, device=G.device)  # (d,)
        out.view(V * d).index_add_(0, (argmax * d + cols).reshape(-1), Gc.reshape(-1))
        return {"weight": out}
    ids, bag, _ = _bags(module, inputs, G)  # (N,), (N,)
    a = _bag_weights(module, inputs, ids, bag, G) * coef[bag]  # (N,)
    out.index_add_(0, ids, a[:, None] * G[bag])  # rows id_j += c_b a_j G_b
    return {"weight": out}


EMBEDDING = register_rule(
    nn.Embedding,
    grads=embedding_grads,
    sq_norms=embedding_sq_norms,
    weighted_sum=embedding_weighted_sum,
)
EMBEDDING_BAG = register_rule(
    nn.EmbeddingBag,
    grads=embedding_bag_grads,
    sq_norms=embedding_bag_sq_norms,
    weighted_sum=embedding_bag_weighted_sum,
    raw_layout=True,
)
