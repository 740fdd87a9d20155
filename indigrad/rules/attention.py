"""``nn.MultiheadAttention``: four Linear maps around a parameter-free attention core.

Batch first, ``h`` heads of ``D = E / h`` features, query ``X_q (n, L, E)``, key and value
``X_k (n, S, kdim)``, ``X_v (n, S, vdim)``:

    Q = X_q W_qᵀ + b_q,  K = X_k W_kᵀ + b_k,  V = X_v W_vᵀ + b_v        in-projections
    K, V += [bias_k], [bias_v] appended (add_bias_kv), then a zero row (add_zero_attn)
    P = softmax(Q_h K_hᵀ / √D + M)    per head                          (n, h, L, S')
    O = concat_h(P V_h)                                                 (n, L, E)
    Y = O W_oᵀ + b_o                                                    out_proj

``M`` is the additive mask: ``attn_mask`` (2-D, or 3-D per example and head),
``key_padding_mask``, or the causal mask, exactly as ``F.multi_head_attention_forward``
combines them. The returned weights are ``P`` (averaged over heads unless
``average_attn_weights=False``). The core mixes positions but never examples, so the
gradients at ``Q, K, V`` and ``O`` are per example; the rule recomputes ``P`` and ``O`` from
the recorded inputs and does the core's backward by hand, with ``G_Y`` and ``G_P`` the
gradients at the two outputs:

    G_O = G_Y W_o                                    einsum("nlo,oe->nle")
    dP  = G_O,h V_hᵀ + G_P (÷ h when averaged)       einsum("nhld,nhsd->nhls")
    G_V = Pᵀ G_O,h                                   einsum("nhls,nhld->nhsd")
    dA  = P ⊙ (dP − Σ_s P ⊙ dP)                      softmax backward
    G_Q = dA K_h / √D,  G_K = dAᵀ Q_h / √D           einsum("nhls,nhsd->nhld"), ("nhls,nhld->nhsd")

Then every projection is a Linear layer with ``T`` extra dims, and its grads, norms
(Goodfellow, ghost or materialised, chosen by cost) and weighted sums are those of
:mod:`indigrad.rules.linear`. The packed ``in_proj_weight (3E, E)`` is the stack of
``W_q, W_k, W_v``: in self-attention (``query is key is value``) it is one Linear map
``X (W_q; W_k; W_v)ᵀ`` with ``G = [G_Q, G_K, G_V]`` (n, L, 3E); with ``key is value`` the
``k`` and ``v`` rows are one map. Row blocks are disjoint, so their squared norms add.
``bias_k`` and ``bias_v`` get the gradient of their appended row:

    d bias_k_i = G_K,i[S],  d bias_v_i = G_V,i[S]    (n, 1, 1, E)

**Read from the graph.** Unless the layer has ``bias_k``/``bias_v`` or zero attention (and
while its projection weights train), nothing is recomputed: before the backward the rule
finds, in the call's part of the autograd graph, ``F.multi_head_attention_forward``'s
matrix products: the out-projection ``O W_oᵀ`` and the in-projections, each read back as
``(T, n, rows)`` by a view that fixes its rows' (T, n) order. Self-attention (``query is
key is value``) projects with the whole ``in_proj_weight``; cross-attention with ``key is
value`` with its q rows and, on the key, its k and v rows together (a ``split`` of the
weight in the graph); three distinct inputs with a ``chunk`` of it, or with the separate
``q_proj_weight``, ``k_proj_weight``, ``v_proj_weight``. The backward then returns the
gradient at each in-projection's output beside ``G_Y``, and ``O`` is what the
out-projection saved. The core's backward above is then autograd's own, so attention
dropout in training mode, masks and ``need_weights`` need nothing of the rule. Where the
graph does not show that pattern, the rule recomputes as above.

Recomputing, dropout on the attention weights in training mode draws masks that cannot be
reproduced: the rule raises (use ``dropout=0.0`` or eval mode). Unbatched (2-D) inputs
raise too: there is no example to attribute them to.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge

from .linear import linear_grads, linear_sq_norms, linear_weighted_sum
from .registry import Inner, Rule, Taken, prepared, register_rule

_DEFAULTS = (None, True, None, True, False)  # key_padding_mask … is_causal


@dataclass(frozen=True)
class _Trains:
    requires_grad: bool


@dataclass(frozen=True)
class _LinearView:
    """What the Linear rule reads of a module: whether weight and bias exist and train."""

    weight: _Trains
    bias: _Trains | None


_Param = tuple[str, slice, Tensor]  # (name, rows of the parameter, the parameter)


@dataclass(frozen=True)
class _Proj:
    """One Linear map of the layer: rows ``w_rows`` of parameter ``weight`` (and rows
    ``b_rows`` of ``bias``) applied to ``A``, with output gradient ``G``."""

    weight: str
    w_rows: slice
    bias: str | None
    b_rows: slice
    A: Tensor  # (n, T, d_in)
    G: Tensor  # (n, T, d_out)
    view: _LinearView
    trains: bool

    @staticmethod
    def make(w: _Param, b: _Param | None, A: Tensor, G: Tensor) -> _Proj:
        view = _LinearView(
            _Trains(w[2].requires_grad), None if b is None else _Trains(b[2].requires_grad)
        )
        trains = w[2].requires_grad or (b is not None and b[2].requires_grad)
        if b is None:
            return _Proj(w[0], w[1], None, slice(None), A, G, view, trains)
        return _Proj(w[0], w[1], b[0], b[1], A, G, view, trains)


def _float_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A bool mask as the additive float mask ``F.multi_head_attention_forward`` makes."""
    if mask is None or mask.is_floating_point():
        return mask
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


def _mask(
    mha: nn.MultiheadAttention,
    L: int,
    S: int,
    kpm: Tensor | None,
    need_weights: bool,
    attn_mask: Tensor | None,
    is_causal: bool,
    dtype: torch.dtype,
) -> Tensor | None:
    """The additive mask, broadcastable to ``(n, h, L, S')``, that
    ``F.multi_head_attention_forward`` applies."""
    extra = int(mha.bias_k is not None) + int(mha.add_zero_attn)  # S' = S + extra
    kpm = _float_mask(kpm, dtype)  # (n, S)
    if is_causal and kpm is None and not need_weights:  # attn_mask is replaced by is_causal
        keep = torch.ones(L, S + extra, dtype=torch.bool, device=mha.out_proj.weight.device)
        return _float_mask(~keep.tril(), dtype)  # (L, S'), top-left aligned like SDPA
    mask = _float_mask(attn_mask, dtype)  # (L, S) or (n h, L, S)
    if mask is not None:
        if mask.dim() == 3:
            mask = mask.reshape(-1, mha.num_heads, L, S)  # (n, h, L, S)
        mask = F.pad(mask, (0, extra))  # (…, L, S')
    if kpm is not None:
        kpm = F.pad(kpm, (0, extra))[:, None, None, :]  # (n, 1, 1, S')
        mask = kpm if mask is None else mask + kpm
    return mask


class _Core(NamedTuple):
    """The recomputed forward of one call, batch first."""

    X: list[Tensor]  # query (n, L, E), key (n, S, kdim), value (n, S, vdim)
    Qh: Tensor  # (n, h, L, D)
    Kh: Tensor  # (n, h, S', D): S keys, then bias_k, then the zero key
    Vh: Tensor  # (n, h, S', D)
    P: Tensor  # (n, h, L, S'), the attention weights
    O: Tensor  # (n, L, E), the heads' outputs concatenated: out_proj's input
    need_weights: bool
    average: bool


def _forward(mha: nn.MultiheadAttention, inputs: tuple[Any, ...]) -> _Core:
    """The attention of one call, recomputed from its inputs as
    ``F.multi_head_attention_forward`` computes it."""
    args = tuple(inputs) + _DEFAULTS[len(inputs) - 3 :]
    query, key, value, kpm, need_weights, attn_mask, average, is_causal = args
    if query.dim() != 3:
        raise RuntimeError(
            f"MultiheadAttention called on unbatched input {tuple(query.shape)}: its "
            "examples cannot be told apart. Call it with a batch dimension, e.g. "
            "query.unsqueeze(1) (batch_first=False) or query.unsqueeze(0) (batch_first=True)."
        )
    if mha.training and mha.dropout > 0:
        raise RuntimeError(
            "MultiheadAttention with dropout > 0 in training mode drew random masks for its "
            "attention weights that cannot be reproduced, so its per-example gradients "
            "cannot be computed. Use dropout=0.0, or put the module in eval mode."
        )
    if not mha.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    n, L, E = query.shape  # (n, L, E)
    S = key.shape[1]
    h, D = mha.num_heads, mha.head_dim
    X = [query, key, value]  # (n, L, E), (n, S, kdim), (n, S, vdim)
    Q, K, V = (F.linear(x, W, b) for x, (W, b) in zip(X, _in_proj(mha), strict=True))
    if mha.bias_k is not None and mha.bias_v is not None:
        K = torch.cat([K, mha.bias_k.expand(n, 1, E)], 1)  # (n, S+1, E)
        V = torch.cat([V, mha.bias_v.expand(n, 1, E)], 1)  # (n, S+1, E)
    Qh = Q.unflatten(2, (h, D)).transpose(1, 2)  # (n, h, L, D)
    Kh = K.unflatten(2, (h, D)).transpose(1, 2)  # (n, h, S', D)
    Vh = V.unflatten(2, (h, D)).transpose(1, 2)  # (n, h, S', D)
    if mha.add_zero_attn:
        Kh = F.pad(Kh, (0, 0, 0, 1))  # (n, h, S', D)
        Vh = F.pad(Vh, (0, 0, 0, 1))  # (n, h, S', D)
    scores = (Qh * math.sqrt(1.0 / D)) @ Kh.transpose(2, 3)  # (n, h, L, S')
    mask = _mask(mha, L, S, kpm, need_weights, attn_mask, is_causal, query.dtype)
    if mask is not None:
        scores = scores + mask  # (n, h, L, S')
    P = scores.softmax(-1)  # (n, h, L, S')
    O = (P @ Vh).transpose(1, 2).reshape(n, L, E)  # (n, L, E)
    return _Core(X, Qh, Kh, Vh, P, O, bool(need_weights), bool(average))


def _in_proj(mha: nn.MultiheadAttention) -> list[tuple[Tensor, Tensor | None]]:
    """``(W, b)`` of the q, k and v projections."""
    E = mha.embed_dim
    b = mha.in_proj_bias  # (3E,) or None
    bs = [None] * 3 if b is None else list(b.split(E))  # 3 × (E,)
    if mha._qkv_same_embed_dim:
        return list(zip(mha.in_proj_weight.split(E), bs, strict=True))  # 3 × (E, E)
    Ws = [mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight]  # (E, E|kdim|vdim)
    return list(zip(Ws, bs, strict=True))


_PRODUCTS = ("AddmmBackward0", "MmBackward0")  # F.linear on rows, with and without a bias
_RESHAPES = ("ViewBackward0", "UnsafeViewBackward0")  # rows back to (L, n, ·), row-major


class _InProj(NamedTuple):
    """One in-projection product found in the graph: rows ``rows`` of parameter ``name``
    applied to input ``which`` (0 query, 1 key, 2 value)."""

    name: str
    rows: slice
    which: int


def _product_with(node: Any, weight: Tensor) -> bool:
    """``node`` is F.linear's matrix product of rows with ``weight`` (through ``weightᵀ``)."""
    return _weight_of(node, {"w": weight}) == ("w", slice(0, weight.shape[0]))


def _weight_of(node: Any, weights: dict[str, Tensor]) -> tuple[str, slice] | None:
    """Which rows of which of ``weights`` the product ``node`` (of :data:`_PRODUCTS`)
    multiplies by, through ``weightᵀ`` or a ``split``/``chunk`` of the weight's rows:
    ``F.multi_head_attention_forward`` splits ``in_proj_weight`` for cross-attention."""
    if type(node).__name__ not in _PRODUCTS:
        return None
    for v, _ in node.next_functions:
        if v is None or type(v).__name__ != "TBackward0":
            continue
        w, nr = v.next_functions[0]
        kind = type(w).__name__ if w is not None else ""
        if kind in ("SplitBackward0", "SplitWithSizesBackward0") and w._saved_dim == 0:
            acc = w.next_functions[0][0]
            name = _named(acc, weights)
            if name is None:
                continue
            total = weights[name].shape[0]
            if kind == "SplitBackward0":
                size = w._saved_split_size
                sizes = [min(size, total - i) for i in range(0, total, size)]
            else:
                sizes = list(w._saved_split_sizes)
            start = sum(sizes[:nr])
            return name, slice(start, start + sizes[nr])
        name = _named(w, weights)
        if name is not None:
            return name, slice(0, weights[name].shape[0])
    return None


def _named(acc: Any, weights: dict[str, Tensor]) -> str | None:
    """The name in ``weights`` of the parameter whose accumulator ``acc`` is."""
    variable = getattr(acc, "variable", None) if acc is not None else None
    return next((k for k, w in weights.items() if w is variable), None)


def _rows(product: Any) -> Any:
    """The rows a product of :data:`_PRODUCTS` saved: F.linear's input, flattened."""
    if type(product).__name__ == "AddmmBackward0":
        return product._saved_mat1
    return product._saved_self


def _in_weights(mha: nn.MultiheadAttention) -> dict[str, Tensor]:
    if mha._qkv_same_embed_dim:
        return {"in_proj_weight": mha.in_proj_weight}
    return {k: getattr(mha, k) for k in ("q_proj_weight", "k_proj_weight", "v_proj_weight")}


def _input_of(mha: nn.MultiheadAttention, name: str, rows: slice) -> int:
    """Which input (0 query, 1 key, 2 value) rows ``rows`` of ``name`` project."""
    if name != "in_proj_weight":
        return ("q_proj_weight", "k_proj_weight", "v_proj_weight").index(name)
    return (rows.start or 0) // mha.embed_dim


def attention_inner(module: nn.Module, node: Any, stop: Sequence[Any]) -> Inner | None:
    """The out-projection's input ``O`` ``(L·n, E)`` and the edges of the in-projections'
    outputs ``(T·n, rows)`` (one for self-attention, two for cross-attention with ``key
    is value``, three otherwise), found below the call's output ``node``; None where the
    graph does not have the expected pattern (the rule then recomputes)."""
    mha = cast(nn.MultiheadAttention, module)
    if mha.bias_k is not None or mha.add_zero_attn:
        return None
    weights = _in_weights(mha)
    W_o = mha.out_proj.weight
    if not (W_o.requires_grad and all(w.requires_grad for w in weights.values())):
        return None
    u = node  # the output: [transposed to batch first] ← view (L, n, E) ← O W_oᵀ (L·n, E)
    if mha.batch_first:
        if type(u).__name__ != "TransposeBackward0":
            return None
        u = u.next_functions[0][0]
    if type(u).__name__ not in _RESHAPES or len(u._input_metadata[0].shape) != 3:
        return None
    L, n, E = u._input_metadata[0].shape
    out = u.next_functions[0][0]
    if not _product_with(out, W_o):
        return None
    O = _rows(out)
    if not isinstance(O, Tensor) or tuple(O.shape) != (L * n, E):
        return None
    found: dict[Any, _InProj] = {}  # each in-projection product X W_rowsᵀ (T·n, rows)
    seen: set[Any] = set()
    stack = [out]
    while stack and len(seen) < 512:
        u = stack.pop()
        if u in seen or u in stop:
            continue
        seen.add(u)
        for v, _ in u.next_functions:
            if v is None or type(v).__name__ == "AccumulateGrad":
                continue
            hit = _weight_of(v, weights)
            if hit is None:
                stack.append(v)
                continue
            name, rows = hit
            viewed = tuple(u._input_metadata[0].shape)  # read as (T, n, rows), row-major
            width = rows.stop - rows.start
            if type(u).__name__ not in _RESHAPES or len(viewed) != 3 or viewed[1:] != (n, width):
                return None
            if tuple(v._input_metadata[0].shape) != (viewed[0] * n, width):
                return None
            piece = _InProj(name, rows, _input_of(mha, name, rows))
            if found.setdefault(v, piece) != piece:
                return None
    if stack or not found or not _covers(mha, weights, list(found.values())):
        return None
    products = list(found)
    return Inner((O, [found[v] for v in products]), tuple(GradientEdge(v, 0) for v in products))


def _covers(mha: nn.MultiheadAttention, weights: dict[str, Tensor], pieces: list[_InProj]) -> bool:
    """The pieces take each row of each in-projection weight once, and the packed weight
    in whole blocks of ``E`` rows (q, k, v)."""
    for name, w in weights.items():
        spans = sorted((p.rows.start, p.rows.stop) for p in pieces if p.name == name)
        ends = [0] + [stop for _, stop in spans]
        if [start for start, _ in spans] != ends[:-1] or ends[-1] != w.shape[0]:
            return False
    E = mha.embed_dim
    return all(p.name != "in_proj_weight" or p.rows.start % E == 0 for p in pieces)


def _taken_pieces(
    mha: nn.MultiheadAttention, inputs: tuple[Any, ...], G: Any, taken: Taken
) -> list[_Proj]:
    """The out- and in-projections of a call from what :func:`attention_inner` found and
    the backward returned."""
    G_Y = G[0] if isinstance(G, tuple | list) else G  # the output's (the weights' is in G_in)
    X = list(inputs[:3])  # query, key, value: (n, T, ·), or (T, n, ·) unless batch first
    if not mha.batch_first:
        X = [x.transpose(0, 1) for x in X]  # (n, T, ·)
        G_Y = None if G_Y is None else G_Y.transpose(0, 1)  # (n, L, E)
    n, L, E = X[0].shape
    O_rows, found = taken.value
    O = O_rows.reshape(L, n, E).transpose(0, 1).to(X[0].dtype)  # (n, L, E)
    if G_Y is None:  # only the attention weights reach the losses
        G_Y = O.new_zeros(n, L, E)  # (n, L, E)
    b_o, b_in = mha.out_proj.bias, mha.in_proj_bias
    out_b = None if b_o is None else ("out_proj.bias", slice(None), b_o)
    pieces = [_Proj.make(("out_proj.weight", slice(None), mha.out_proj.weight), out_b, O, G_Y)]
    for piece, G_in in zip(found, taken.grads, strict=True):
        A = X[piece.which]  # (n, T, d_in)
        T, width = A.shape[1], piece.rows.stop - piece.rows.start
        if G_in is None:
            G_in = A.new_zeros(T * n, width)
        G_in = G_in.reshape(T, n, width).transpose(0, 1).to(A.dtype)  # (n, T, rows)
        rows = piece.rows if piece.name == "in_proj_weight" else _bias_rows(mha, piece.which)
        w_rows = piece.rows if piece.name == "in_proj_weight" else slice(None)
        weight = (piece.name, w_rows, getattr(mha, piece.name))
        bias = None if b_in is None else ("in_proj_bias", rows, b_in)
        pieces.append(_Proj.make(weight, bias, A, G_in))
    return pieces


def _bias_rows(mha: nn.MultiheadAttention, which: int) -> slice:
    """The rows of ``in_proj_bias`` of input ``which``'s separate projection weight."""
    E = mha.embed_dim
    return slice(which * E, (which + 1) * E)


def _pieces(
    module: nn.Module, inputs: tuple[Any, ...], G: Any
) -> tuple[list[_Proj], dict[str, Tensor]]:
    """The call's trainable Linear maps with their inputs and output gradients, and the
    per-example gradients of ``bias_k`` and ``bias_v``."""
    mha = cast(nn.MultiheadAttention, module)
    if inputs and isinstance(inputs[-1], Taken):
        return _taken_pieces(mha, inputs[:-1], G, inputs[-1]), {}
    X, Qh, Kh, Vh, P, O, need_weights, average = _forward(mha, inputs)
    G_Y, G_P = G if isinstance(G, tuple | list) else (G, None)  # output, weights (batch first)
    if G_Y is not None and not mha.batch_first:
        G_Y = G_Y.transpose(0, 1)  # (n, L, E)
    n, L, E = X[0].shape
    S = X[1].shape[1]
    h, D = mha.num_heads, mha.head_dim
    scale = math.sqrt(1.0 / D)
    W_o, b_o = mha.out_proj.weight, mha.out_proj.bias  # (E, E), (E,)
    b_in = mha.in_proj_bias  # (3E,) or None
    rows = [slice(0, E), slice(E, 2 * E), slice(2 * E, 3 * E)]
    ws: list[_Param]
    if mha._qkv_same_embed_dim:
        ws = [("in_proj_weight", r, mha.in_proj_weight) for r in rows]  # (3E, E)
    else:
        names = ("q_proj_weight", "k_proj_weight", "v_proj_weight")
        ws = [(k, slice(None), getattr(mha, k)) for k in names]
    bs: list[_Param | None] = [None if b_in is None else ("in_proj_bias", r, b_in) for r in rows]

    if G_Y is None:  # only the attention weights reach the losses
        G_Y = O.new_zeros(n, L, E)  # (n, L, E)
    out_b = None if b_o is None else ("out_proj.bias", slice(None), b_o)
    pieces = [_Proj.make(("out_proj.weight", slice(None), W_o), out_b, O, G_Y)]
    direct: dict[str, Tensor] = {}
    kv = [p for p in (mha.bias_k, mha.bias_v) if p is not None]
    trains_in = any(w.requires_grad for _, _, w in ws) or (b_in is not None and b_in.requires_grad)
    if not (trains_in or any(p.requires_grad for p in kv)):
        return pieces, direct

    # the core's backward, by hand
    G_O = (G_Y @ W_o).unflatten(2, (h, D)).transpose(1, 2)  # (n, h, L, D)
    dP = G_O @ Vh.transpose(2, 3)  # (n, h, L, S')
    if need_weights and G_P is not None:  # (n, L, S') averaged over heads, or (n, h, L, S')
        dP = dP + (G_P[:, None] / h if average else G_P)  # (n, h, L, S')
    dA = P * (dP - (P * dP).sum(-1, keepdim=True))  # (n, h, L, S')
    G_Q = ((dA @ Kh) * scale).transpose(1, 2).reshape(n, L, E)  # (n, L, E)
    G_K = ((dA.transpose(2, 3) @ Qh) * scale).transpose(1, 2).flatten(2)  # (n, S', E)
    G_V = (P.transpose(2, 3) @ G_O).transpose(1, 2).flatten(2)  # (n, S', E)
    if kv:
        direct["bias_k"] = G_K[:, S, None, None]  # (n, 1, 1, E)
        direct["bias_v"] = G_V[:, S, None, None]  # (n, 1, 1, E)
    Gs = [G_Q, G_K[:, :S], G_V[:, :S]]  # (n, L, E), (n, S, E), (n, S, E)

    groups = [[0], [1], [2]]  # q, k, v: three Linear maps
    if mha._qkv_same_embed_dim and inputs[1] is inputs[2]:  # packed rows on a shared input
        groups = [[0, 1, 2]] if inputs[0] is inputs[1] else [[0], [1, 2]]
    for g in groups:
        w, b = ws[g[0]], bs[g[0]]
        if len(g) > 1:  # one map: rows g[0]·E … (g[-1] + 1)·E of the packed parameters
            span = slice(g[0] * E, (g[-1] + 1) * E)
            w = (w[0], span, w[2])
            b = None if b is None else (b[0], span, b[2])
        G_g = torch.cat([Gs[i] for i in g], -1) if len(g) > 1 else Gs[g[0]]  # (n, T, |g|·E)
        piece = _Proj.make(w, b, X[g[0]], G_g)
        if piece.trains:
            pieces.append(piece)
    return pieces, direct


_Blocks = dict[str, list[tuple[slice, Tensor]]]


def _collect(pieces: list[_Proj], fn: Any, *coef: Tensor) -> _Blocks:
    """``fn`` (a Linear rule function) on each piece, its results by parameter and rows."""
    blocks: _Blocks = {}
    for p in pieces:
        values = fn(p.view, (p.A,), p.G, *coef)
        if "weight" in values:
            blocks.setdefault(p.weight, []).append((p.w_rows, values["weight"]))
        if p.bias is not None and "bias" in values:
            blocks.setdefault(p.bias, []).append((p.b_rows, values["bias"]))
    return blocks


def _join(blocks: _Blocks, dim: int) -> dict[str, Tensor]:
    """Row blocks of each parameter, concatenated in row order along ``dim``."""
    out = {}
    for name, parts in blocks.items():
        parts.sort(key=lambda part: part[0].start or 0)
        out[name] = parts[0][1] if len(parts) == 1 else torch.cat([t for _, t in parts], dim)
    return out


def attention_grads(module: nn.Module, inputs: tuple[Any, ...], G: Any) -> dict[str, Tensor]:
    pieces, direct = prepared(_pieces, module, inputs, G)
    out = dict(direct)  # a new dict: the prepared one is shared with the other functions
    out.update(_join(_collect(pieces, linear_grads), 1))  # (n, *param.shape)
    return out


def attention_sq_norms(module: nn.Module, inputs: tuple[Any, ...], G: Any) -> dict[str, Tensor]:
    pieces, direct = prepared(_pieces, module, inputs, G)
    out = {k: g.flatten(1).square().sum(1) for k, g in direct.items()}  # (n,)
    for name, parts in _collect(pieces, linear_sq_norms).items():
        out[name] = torch.stack([t for _, t in parts]).sum(0)  # (n,): disjoint rows add
    return out


def attention_weighted_sum(
    module: nn.Module, inputs: tuple[Any, ...], G: Any, coef: Tensor
) -> dict[str, Tensor]:
    pieces, direct = prepared(_pieces, module, inputs, G)
    out = {k: torch.tensordot(coef.to(g.dtype), g, dims=1) for k, g in direct.items()}
    out.update(_join(_collect(pieces, linear_weighted_sum, coef), 0))  # param.shape
    return out


MULTIHEAD_ATTENTION = register_rule(
    nn.MultiheadAttention,
    Rule(
        attention_grads,
        attention_sq_norms,
        attention_weighted_sum,
        raw_layout=True,
        subtree=True,
        inner=attention_inner,
        prepare=_pieces,  # recomputed once per call where it is not read from the graph
    ),
)
