"""``nn.RNN``, ``nn.LSTM``, ``nn.GRU``: a recurrence over ``T`` steps per layer and direction.

Layer ``l`` in one direction (suffix ``_l{l}``, plus ``_reverse`` for the backward one) reads
the step input ``x_t`` (n, d_in) and its previous state ``h_{t-1}`` (n, H_out) through two
Linear maps at every step (``k`` gates of size ``H``: 1 for RNN, 4 for LSTM, 3 for GRU):

    gi_t = x_t W_ihᵀ + b_ih                                   (n, k·H)
    gh_t = h_{t-1} W_hhᵀ + b_hh                               (n, k·H)
    RNN   h_t = act(gi_t + gh_t)                              act = tanh or relu
    LSTM  i, f, g, o = σ, σ, tanh, σ of the chunks of gi_t + gh_t
          c_t = f c_{t-1} + i g,   m_t = o tanh(c_t),   h_t = m_t
          proj_size P:   h_t = r_t = m_t W_hrᵀ                (n, P), a third Linear map
    GRU   r, z = σ(gi_t + gh_t) on the first two thirds
          n_t = tanh(gi_n + r ⊙ gh_n),   h_t = (1 - z) n_t + z h_{t-1}
          (b_hn sits inside r ⊙ (W_hn h + b_hn): it belongs to gh_t, not gi_t)

With ``dgi, dgh, dr`` the gradients of ⟨outputs, G⟩ (output sequence, h_n, c_n) with respect
to every step's ``gi_t, gh_t, r_t``, each weight is a Linear with ``T`` extra dims, so
``grads``, ``sq_norms`` (Goodfellow / ghost / materialised, by cost) and ``weighted_sum`` are
those of ``linear.py``:

    weight_ih   dW_i = Σ_t dgi_it ⊗ x_it                      einsum("ntg,ntd->ngd")
    weight_hh   dW_i = Σ_t dgh_it ⊗ h_i,t-1                   einsum("ntg,nth->ngh")
    weight_hr   dW_i = Σ_t dr_it ⊗ m_it                       einsum("ntp,nth->nph")
    bias_ih     db_i = Σ_t dgi_it                             (RNN, LSTM: dgi = dgh)
    bias_hh     db_i = Σ_t dgh_it

The step gradients come from recomputing the recurrence step by step with grad enabled,
from the detached inputs and the module's weights, and ONE ``torch.autograd.grad`` of
⟨recomputed outputs, G⟩ (G of the output sequence, h_n and c_n, where one arrived) to every
step's ``gi_t, gh_t, r_t``. A recurrence never mixes examples, so they are per example. The
recurrence is recomputed once per call (``prepare``) for all three quantities.

Every layer without a projection (an LSTM's ``proj_size``) on a padded input takes a
shorter way (:func:`_by_hand`): the top layer's states are the call's output sequence
(``Rule.output``); those of the layers below come from the graph where the forward saved
them (:func:`rnn_inner`, on CPU), or else from the fused kernel run again (``torch.lstm``,
``torch.gru``, ``torch.rnn_tanh``, ``torch.rnn_relu``, no grad); its gates
from two batched products; and the backward through cells and states is written out, a few
operations per step, so no step runs under autograd. That backward gives the gradient at
the layer's input as well (``Σ_directions dgi W_ih`` of the first layer), so the capture's
backward is split at the layer (``Rule.split``, ``indigrad/_split.py``): autograd never
runs the layer's own backward where the graph below it is reached through it alone.

Layouts: ``batch_first`` both ways; ``h0`` (``(h0, c0)`` for LSTM) given or zero. A
``PackedSequence`` input is padded in the original example order; an example's steps past
its length leave its state unchanged (the reverse direction starts at its last valid step)
and get zero ``G``. Dropout between layers in training mode draws masks that cannot be
reproduced: an error.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence
from torch.utils._pytree import tree_flatten

from .linear import linear_grads, linear_sq_norms, linear_weighted_sum
from .registry import Inner, Output, Rule, Split, Taken, prepared, register_rule

_MODES = ("RNN_TANH", "RNN_RELU", "LSTM", "GRU")
_FUSED = True  # states by the fused kernel and a backward by hand (tests turn it off)


@dataclass
class _Unrolled:
    """The recomputed recurrence, batch first, in the original example order."""

    out: Tensor  # (n, T, D·H_out), zero past each example's length
    h_n: Tensor  # (L·D, n, H_out)
    c_n: Tensor | None  # (L·D, n, H), LSTM only
    steps: dict[str, list[Tensor]]  # "gi_l0", "gh_l0", "r_l0", …: T × (n, ·), in time order
    values: dict[str, Tensor]  # "x_l0", "h_l0", "m_l0", …: the Linear inputs, (n, T, ·)


@dataclass
class _Piece:
    """One Linear map of a layer and direction, shaped for ``linear.py``: ``weight`` and
    ``bias`` are read there; ``names`` are their names in the module."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    names: tuple[str, str | None]
    step: str  # key in _Unrolled.steps of the gradient at its output
    value: str  # key in _Unrolled.values of its input


def _check(module: nn.Module, inputs: tuple[Any, ...]) -> nn.RNNBase:
    rnn = cast(nn.RNNBase, module)
    if rnn.mode not in _MODES:
        raise NotImplementedError(f"{type(module).__name__}: unknown RNN mode {rnn.mode!r}")
    if rnn.training and rnn.dropout > 0 and rnn.num_layers > 1:
        raise RuntimeError(
            f"{type(module).__name__} has dropout={rnn.dropout} between its layers and is in "
            "training mode: its random masks cannot be reproduced, so no per-example "
            "gradient can be computed. Put it in eval mode, or set dropout=0 and apply "
            "nn.Dropout between single-layer RNNs instead."
        )
    x = inputs[0]
    if not isinstance(x, PackedSequence) and x.dim() != 3:
        raise RuntimeError(
            f"{type(module).__name__} got an unbatched input of shape {tuple(x.shape)}: "
            "give it a batch dimension of size 1 (dim 1, or dim 0 with batch_first=True)"
        )
    return rnn


def _suffix(layer: int, direction: int) -> str:
    return f"_l{layer}" + ("_reverse" if direction else "")


def _unroll(module: nn.Module, inputs: tuple[Any, ...]) -> _Unrolled:
    """Recompute the module's forward step by step with grad enabled (a graph from every
    step's ``gi_t``, ``gh_t``, ``r_t`` to the outputs)."""
    rnn = _check(module, inputs)
    x, hx = inputs[0], inputs[1] if len(inputs) > 1 else None
    keep: Tensor | None = None
    if isinstance(x, PackedSequence):
        x, lengths = pad_packed_sequence(x, batch_first=True)  # (n, T, d_in), (n,) on CPU
        T = x.shape[1]
        keep = (torch.arange(T)[None, :] < lengths[:, None]).to(x.device)[:, :, None]  # (n, T, 1)
    elif not rnn.batch_first:
        x = x.transpose(0, 1)  # (n, T, d_in)
    x = x.detach()  # (n, T, d_in)
    n, T = x.shape[0], x.shape[1]
    L, D, H, mode = rnn.num_layers, 2 if rnn.bidirectional else 1, rnn.hidden_size, rnn.mode
    H_out = rnn.proj_size or H
    lstm = mode == "LSTM"
    if hx is None:
        h0 = x.new_zeros(L * D, n, H_out)  # (L·D, n, H_out)
        c0 = x.new_zeros(L * D, n, H) if lstm else None  # (L·D, n, H)
    elif lstm:
        h0, c0 = hx[0].detach(), hx[1].detach()  # (L·D, n, H_out), (L·D, n, H)
    else:
        h0, c0 = hx.detach(), None  # (L·D, n, H_out)
    steps: dict[str, list[Tensor]] = {}
    values: dict[str, Tensor] = {}
    h_final: list[Tensor] = []  # L·D × (n, H_out)
    c_final: list[Tensor] = []  # L·D × (n, H), LSTM only
    layer_in = x  # (n, T, d_in)
    with torch.enable_grad():
        for layer in range(L):
            outs = []
            for direction in range(D):
                s = _suffix(layer, direction)
                # detached weights that require grad: the graph exists, no weight grad is taken
                W_ih = getattr(rnn, f"weight_ih{s}").detach().requires_grad_()  # (k·H, d_in)
                W_hh = getattr(rnn, f"weight_hh{s}").detach().requires_grad_()  # (k·H, H_out)
                b_ih = getattr(rnn, f"bias_ih{s}").detach() if rnn.bias else None  # (k·H,)
                b_hh = getattr(rnn, f"bias_hh{s}").detach() if rnn.bias else None  # (k·H,)
                W_hr = getattr(rnn, f"weight_hr{s}").detach() if rnn.proj_size else None  # (P, H)
                gi = list(F.linear(layer_in, W_ih, b_ih).unbind(1))  # T × (n, k·H)
                h = h0[layer * D + direction]  # (n, H_out)
                c = None if c0 is None else c0[layer * D + direction]  # (n, H)
                hs, prev, gh, m, r = ([h] * T for _ in range(5))  # T × (n, ·), filled below
                for t in range(T) if direction == 0 else range(T - 1, -1, -1):
                    prev[t] = h  # (n, H_out)
                    gh[t] = F.linear(h, W_hh, b_hh)  # (n, k·H)
                    if mode == "GRU":
                        gi_r, gi_z, gi_n = gi[t].chunk(3, 1)  # 3 × (n, H)
                        gh_r, gh_z, gh_n = gh[t].chunk(3, 1)  # 3 × (n, H)
                        rg, zg = torch.sigmoid(gi_r + gh_r), torch.sigmoid(gi_z + gh_z)  # (n, H)
                        cand = torch.tanh(gi_n + rg * gh_n)  # (n, H)
                        new = cand + zg * (h - cand)  # (n, H)
                    elif lstm:
                        assert c is not None
                        ig, fg, gg, og = (gi[t] + gh[t]).chunk(4, 1)  # 4 × (n, H)
                        c_new = torch.sigmoid(fg) * c + torch.sigmoid(ig) * torch.tanh(gg)  # (n, H)
                        new = m[t] = torch.sigmoid(og) * torch.tanh(c_new)  # (n, H)
                        if W_hr is not None:
                            new = r[t] = F.linear(m[t], W_hr)  # (n, P)
                        c = c_new if keep is None else torch.where(keep[:, t], c_new, c)  # (n, H)
                    else:
                        act = torch.tanh if mode == "RNN_TANH" else torch.relu
                        new = act(gi[t] + gh[t])  # (n, H)
                    if keep is not None:
                        new = torch.where(keep[:, t], new, h)  # (n, H_out), held past the length
                    h = hs[t] = new  # (n, H_out)
                h_final.append(h)  # (n, H_out)
                if c is not None:
                    c_final.append(c)  # (n, H)
                outs.append(torch.stack(hs, 1))  # (n, T, H_out)
                steps[f"gi{s}"], steps[f"gh{s}"], steps[f"r{s}"] = gi, gh, r
                values[f"x{s}"] = layer_in.detach()  # (n, T, d_in)
                values[f"h{s}"] = torch.stack(prev, 1).detach()  # (n, T, H_out)
                if W_hr is not None:
                    values[f"m{s}"] = torch.stack(m, 1).detach()  # (n, T, H)
            layer_in = torch.cat(outs, 2)  # (n, T, D·H_out)
        out = layer_in if keep is None else layer_in * keep  # (n, T, D·H_out)
        h_n = torch.stack(h_final)  # (L·D, n, H_out)
        c_n = torch.stack(c_final) if c_final else None  # (L·D, n, H)
    return _Unrolled(out=out, h_n=h_n, c_n=c_n, steps=steps, values=values)


def _packed_data(g: Any) -> Tensor | None:
    """The gradient of a PackedSequence output's ``data`` (n_packed, ·), however the
    output structure came back: a PackedSequence, its leaves, or the data alone."""
    if g is None or isinstance(g, Tensor):
        return g
    return cast(Tensor | None, g[0])  # PackedSequence or (data, batch_sizes, …)


def _inner(rnn: nn.RNNBase, inputs: tuple[Any, ...], G: Any, u: _Unrolled) -> Tensor | None:
    """⟨outputs, G⟩ over the recomputed outputs that received a gradient (None if none did).
    ``G`` is ``(G_output, G_h_n)``, or ``(G_output, (G_h_n, G_c_n))`` for LSTM."""
    g_out, g_state = G
    x = inputs[0]
    if isinstance(x, PackedSequence):
        g_data = _packed_data(g_out)  # (n_packed, D·H_out)
        g_out = None
        if g_data is not None:
            packed = PackedSequence(g_data, x.batch_sizes, x.sorted_indices, x.unsorted_indices)
            T = u.out.shape[1]
            g_out = pad_packed_sequence(packed, batch_first=True, total_length=T)[0]  # (n, T, ·)
    elif g_out is not None and not rnn.batch_first:
        g_out = g_out.transpose(0, 1)  # (n, T, D·H_out)
    if rnn.mode == "LSTM":
        g_h, g_c = (None, None) if g_state is None else g_state  # (L·D, n, H_out), (L·D, n, H)
    else:
        g_h, g_c = g_state, None  # (L·D, n, H_out)
    inner = None
    for o, g in ((u.out, g_out), (u.h_n, g_h), (u.c_n, g_c)):
        if o is not None and g is not None:
            term = (o * g.to(o.dtype)).sum()  # ()
            inner = term if inner is None else inner + term  # ()
    return inner


def _by_hand(
    rnn: nn.RNNBase,
    inputs: tuple[Any, ...],
    G: Any,
    states: dict[tuple[int, int], Tensor],
    input_grad: bool = False,
    output: Any = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor | None] | None:
    """For a layer without a projection on a padded input: the Linear maps' inputs
    ``x{s}``, ``h{s}`` and the gradients ``gi{s}``, ``gh{s}`` (n, T, k·H) at their outputs,
    for every layer and direction, without recomputing the recurrence step by step under
    autograd. Each layer's states come from the graph, from the call's output (the top
    layer) or from one call of the fused kernel; its gates from two batched products (an
    LSTM's cells from a loop of one op per step); the backward through the cells and
    states is written out (:class:`_LSTMCells`, :class:`_GRUCells`, :class:`_RNNCells`), a
    few ops per step, from the top layer down; the layer below's G is ``Σ_directions dgi
    W_ih``, and with ``input_grad`` so is the gradient at the input ``x`` (n, T, d_in),
    returned last (None without).

    ``states``: layers' and directions' states as the forward saved them, ``(T, n, H)``
    or ``(T·n, H)`` (:func:`rnn_inner`, CPU); ``output``: the call's output, whose
    sequence is the top layer's states. A layer without either is run again.
    None for the other forms (the recurrence is then recomputed under autograd)."""
    x = inputs[0]
    if not _by_hand_takes(rnn, x):
        return None
    hx = inputs[1] if len(inputs) > 1 else None
    g_out, g_state = G
    if g_out is not None:
        g_out = g_out.to(x.dtype)
    if not rnn.batch_first:
        x = x.transpose(0, 1)  # (n, T, d_in)
        g_out = None if g_out is None else g_out.transpose(0, 1)  # (n, T, D·H)
    x = x.detach()
    top = None if output is None else output[0]  # the top layer's states
    if top is not None and not rnn.batch_first:
        top = top.transpose(0, 1)  # (n, T, D·H)
    n = x.shape[0]
    L, D, H = rnn.num_layers, 2 if rnn.bidirectional else 1, rnn.hidden_size
    lstm = rnn.mode == "LSTM"
    if hx is None:
        h0 = x.new_zeros(L * D, n, H)  # (L·D, n, H)
        c0 = h0 if lstm else None
    elif lstm:
        h0, c0 = hx[0].detach(), hx[1].detach()  # (L·D, n, H)
    else:
        h0, c0 = hx.detach(), None  # (L·D, n, H)
    if lstm:
        g_h, g_c = (None, None) if g_state is None else g_state  # (L·D, n, H) each, or None
    else:
        g_h, g_c = g_state, None  # (L·D, n, H) or None
    cells_of = _CELLS[rnn.mode]
    layers = []  # per layer: its input and, per direction, what the backward needs
    layer_in = x  # (n, T, d_in)
    with torch.no_grad():
        for layer in range(L):
            saved = _saved(states, layer, D, x.shape[:2], H)
            if saved is not None:  # (n, T, D·H) read from the graph
                out = saved
            elif layer == L - 1 and top is not None:  # (n, T, D·H) the call's output
                out = top
            else:  # (n, T, D·H) by the fused kernel again
                names = _NAMES if rnn.bias else _NAMES[:2]
                weights = [getattr(rnn, f"{k}{_suffix(layer, d)}") for d in range(D) for k in names]
                h = h0[layer * D : (layer + 1) * D]  # (D, n, H)
                state = (h, c0[layer * D : (layer + 1) * D]) if c0 is not None else h
                out = _run_layer(rnn, layer_in, state, weights)
            dirs = []
            for d in range(D):
                k = layer * D + d  # the layer and direction's initial state
                hs = out[..., d * H : (d + 1) * H]  # (n, T, H)
                prev = _previous(hs, h0[k], d == 1)  # (n, T, H)
                dirs.append(
                    cells_of(rnn, layer, d, layer_in, hs, prev, None if c0 is None else c0[k])
                )
            layers.append((layer_in, dirs))
            layer_in = out  # (n, T, D·H)
        values: dict[str, Tensor] = {}
        grads: dict[str, Tensor] = {}
        G_layer = g_out  # (n, T, D·H) or None
        for layer in range(L - 1, -1, -1):
            layer_in, dirs = layers[layer]
            below = None  # the gradient at this layer's input
            for d, cells in enumerate(dirs):
                s = _suffix(layer, d)
                Gh = None if G_layer is None else G_layer[..., d * H : (d + 1) * H]
                k = layer * D + d
                dgi, dgh = cells.backward(
                    Gh,
                    None if g_h is None else g_h[k].to(x.dtype),
                    None if g_c is None else g_c[k].to(x.dtype),
                    d == 1,
                )  # (n, T, k·H) each
                values[f"x{s}"], values[f"h{s}"] = layer_in, cells.prev  # (n, T, d_in), (n, T, H)
                grads[f"gi{s}"], grads[f"gh{s}"] = dgi, dgh
                if layer > 0 or input_grad:
                    W_ih = getattr(rnn, f"weight_ih{s}")  # (k·H, d_in)
                    term = dgi @ W_ih  # (n, T, d_in)
                    below = term if below is None else below + term
            G_layer = below
    return values, grads, G_layer if input_grad else None


def _by_hand_takes(rnn: nn.RNNBase, x: Any) -> bool:
    """Whether :func:`_by_hand` takes a call on input ``x``: no projection, a padded input,
    and one precision (the unrolled recurrence says what it makes of mixed ones)."""
    return (
        not rnn.proj_size
        and not isinstance(x, PackedSequence)
        and x.dtype == rnn.weight_ih_l0.dtype
    )


def _saved(
    states: dict[tuple[int, int], Tensor], layer: int, D: int, nT: Any, H: int
) -> Tensor | None:
    """One layer's states ``(n, T, D·H)`` from those :func:`rnn_inner` read, or None
    where it read none (or not all of its directions, or not of this size)."""
    parts = [states.get((layer, d)) for d in range(D)]
    n, T = nT
    if any(p is None or p.numel() != T * n * H for p in parts):
        return None
    return torch.cat([cast(Tensor, p).reshape(T, n, H).transpose(0, 1) for p in parts], 2)


_NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
_KERNELS: dict[str, Callable[..., tuple[Tensor, ...]]] = {
    "LSTM": torch.lstm,
    "GRU": torch.gru,
    "RNN_TANH": torch.rnn_tanh,
    "RNN_RELU": torch.rnn_relu,
}


def _run_layer(rnn: nn.RNNBase, x: Tensor, state: Any, weights: list[Tensor]) -> Tensor:
    """One layer, all its directions, by the fused kernel: its states ``(n, T, D·H)``
    from its input ``x`` (n, T, d_in), batch first."""
    kernel = _KERNELS[rnn.mode]
    return kernel(x, state, weights, rnn.bias, 1, 0.0, False, rnn.bidirectional, True)[0]


_LAYER_NODE = "MkldnnRnnLayerBackward0"  # an LSTM on CPU (float32): a layer and direction
# A GRU's or RNN's layers on CPU (and an LSTM's in float64) run step by step, each above the
# first after one product of all its inputs with ``W_ihᵀ``, which saves them: the states of
# the layer below. The node and the name of its saved input, by the product's kind.
_PRODUCTS = {"AddmmBackward0": "_saved_mat1", "MmBackward0": "_saved_self"}


def rnn_inner(module: nn.Module, node: Any, stop: Sequence[Any]) -> Inner | None:
    """The states of every layer but the top one (which are the call's output), as the
    forward saved them, keyed ``(layer, direction)``: ``(T, n, H)`` where the fused kernel
    runs one LSTM layer and direction per node (on CPU, keyed by the input weight it
    saved), or ``(T·n, H)`` from the input of a layer's product with ``W_ihᵀ`` (keyed by
    that weight). None where there are none. A breadth-first walk of the call's part of
    the graph, which ends once every layer below the top is found."""
    rnn = cast(nn.RNNBase, module)
    L, D, H = rnn.num_layers, 2 if rnn.bidirectional else 1, rnn.hidden_size
    if rnn.proj_size or L == 1:
        return None
    weights = [
        (getattr(rnn, f"weight_ih{_suffix(k, d)}"), k, d) for k in range(L) for d in range(D)
    ]
    keys = {id(w): (k, d) for w, k, d in weights}  # an LSTM layer node's own weight
    # a product's W_ihᵀ by its memory, shape and strides (parameters may share a buffer)
    above = {_where(w.T): k for w, k, _ in weights if k > 0}
    wanted = (L - 1) * D  # the states of every layer below the top, each direction
    hh = [getattr(rnn, f"weight_hh{_suffix(k, d)}").T for k in range(L) for d in range(D)]
    if len(above) < wanted or any(_where(w) in above for w in hh):
        return None  # weights that alias one another: a product's layer is not known
    states: dict[tuple[int, int], Tensor] = {}
    seen: set[Any] = set()
    queue = collections.deque([node])
    while queue and len(states) < wanted:
        u = queue.popleft()
        if u is None or u in seen or u in stop:
            continue
        seen.add(u)
        kind = type(u).__name__
        if kind == _LAYER_NODE:
            key = keys.get(id(u._saved_weight0))
            if key is not None and key[0] < L - 1 and bool(u._saved_reverse) == (key[1] == 1):
                states[key] = u._saved_result0  # (T, n, H)
        elif kind in _PRODUCTS:
            w = u._saved_mat2  # W_ihᵀ of the layer above, or another product's
            k = None if w is None else above.get(_where(w))
            if k is not None:
                x = getattr(u, _PRODUCTS[kind])  # (T·n, D·H): layer k - 1's states
                if x is not None and x.dim() == 2 and x.shape[1] == D * H:
                    states.update(((k - 1, d), x[:, d * H : (d + 1) * H]) for d in range(D))
        queue.extend(v for v, _ in u.next_functions if type(v).__name__ != "AccumulateGrad")
    return Inner(states, ()) if states else None


def _gates(rnn: nn.RNNBase, layer: int, d: int, x: Tensor, prev: Tensor) -> tuple[Tensor, Tensor]:
    """``gi = x W_ihᵀ + b_ih`` and ``gh = h_{t-1} W_hhᵀ + b_hh`` of one layer and direction at
    every step, from its input ``x`` (n, T, d_in) and previous states ``prev`` (n, T, H):
    (n, T, k·H) each."""
    s = _suffix(layer, d)
    gi = torch.matmul(x, getattr(rnn, f"weight_ih{s}").T)  # (n, T, k·H)
    gh = torch.matmul(prev, getattr(rnn, f"weight_hh{s}").T)  # (n, T, k·H)
    if rnn.bias:
        gi += getattr(rnn, f"bias_ih{s}")
        gh += getattr(rnn, f"bias_hh{s}")
    return gi, gh


def _order(T: int, reverse: bool) -> range:
    """The steps of a backward through time: last to first (first to last in reverse)."""
    return range(T) if reverse else range(T - 1, -1, -1)


def _start(like: Tensor, given: Tensor | None) -> Tensor:
    """The gradient at the final state or cell (n, H): the one given, or zeros."""
    return like.new_zeros(like.shape[0], like.shape[2]) if given is None else given


def _where(t: Tensor) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """Where a tensor's elements are: its first element's address, its shape, its strides."""
    return t.data_ptr(), tuple(t.shape), t.stride()


def _steps(T: int, reverse: bool) -> list[tuple[int, int | None]]:
    """Each step of a backward through time (:func:`_order`) with the one after it, None
    after the last: the next step's ``G`` is added where the carry to it is made, in the
    same operation, and the last step makes no carry (it would be the gradient at h0,
    which the rule does not need)."""
    order = list(_order(T, reverse))
    return list(zip(order, [*order[1:], None], strict=True))


def _first(like: Tensor, given: Tensor | None, Ghs: Sequence[Tensor] | None, t: int) -> Tensor:
    """The gradient at the state of the backward's first step ``t`` (n, H): the one
    given at the final state (or zeros), plus the step's ``G``."""
    if Ghs is None:
        return _start(like, given)
    return Ghs[t] if given is None else given + Ghs[t]


class _Cells(Protocol):
    """One layer and direction's forward, kept for its backward through time."""

    prev: Tensor  # each step's previous state, (n, T, H)

    def backward(
        self, Gh: Tensor | None, g_hn: Tensor | None, g_cn: Tensor | None, reverse: bool
    ) -> tuple[Tensor, Tensor]:
        """``dgi``, ``dgh`` (n, T, k·H), given the gradient ``Gh`` (n, T, H) at the
        states (None: none arrived) and those at the final state and cell."""
        ...


@dataclass
class _LSTMCells:
    """One layer and direction of an LSTM, batch first, in time order: its previous
    states, gates and cells (n, T, ·), and its recurrent weight."""

    prev: Tensor  # h_{t-1} (h_{t+1} in the reverse direction)
    i: Tensor
    f: Tensor
    g: Tensor
    o: Tensor
    c: Tensor
    c_prev: Tensor
    W_hh: Tensor  # (4H, H)

    def backward(
        self, Gh: Tensor | None, g_hn: Tensor | None, g_cn: Tensor | None, reverse: bool
    ) -> tuple[Tensor, Tensor]:
        """The gate gradients ``dz`` (n, T, 4H) (``dgi = dgh = dz``), given the gradient
        ``Gh`` (n, T, H) at the states and those at the final state and cell:

            dh_t = G_t + dz_{t+1} W_hh,   dc_t = dh_t o_t (1 − tanh² c_t) + dc_{t+1} f_{t+1}
            dz_t = [dc_t g_t i_t (1 − i_t), dc_t c_{t−1} f_t (1 − f_t), dc_t i_t (1 − g_t²),
                    dh_t tanh c_t o_t (1 − o_t)]"""
        i, f, g, o, c = self.i, self.f, self.g, self.o, self.c
        tc = c.tanh()  # (n, T, H)
        from_dh = (o * (1 - tc * tc)).unbind(1)  # T × (n, H): dc from dh
        # dz = K ⊙ [dc, dc, dc, dh]
        K = torch.cat(
            [g * i * (1 - i), self.c_prev * f * (1 - f), i * (1 - g * g), tc * o * (1 - o)], 2
        )
        Ks, fs = K.unbind(1), f.unbind(1)  # T × (n, 4H), T × (n, H)
        Ghs = None if Gh is None else Gh.unbind(1)  # T × (n, H)
        steps = _steps(c.shape[1], reverse)
        dh, dc = _first(c, g_hn, Ghs, steps[0][0]), _start(c, g_cn)  # (n, H) each
        dzs = list(Ks)  # T × (n, 4H), filled below
        W = self.W_hh
        for t, after in steps:
            dc = torch.addcmul(dc, dh, from_dh[t])  # (n, H)
            dz = dzs[t] = Ks[t] * torch.cat([dc, dc, dc, dh], 1)  # (n, 4H)
            if after is None:
                break
            # dz W_hh, plus the next step's G where there is one: (n, H)
            dh = torch.mm(dz, W) if Ghs is None else torch.addmm(Ghs[after], dz, W)
            dc = dc * fs[t]  # (n, H)
        dz = torch.stack(dzs, 1)  # (n, T, 4H)
        return dz, dz


def _lstm_cells(
    rnn: nn.RNNBase, layer: int, d: int, x: Tensor, hs: Tensor, prev: Tensor, c0: Tensor | None
) -> _LSTMCells:
    """The gates and cells of one direction from its input ``x``, states ``hs``, previous
    states ``prev`` and initial cell ``c0`` (n, H)."""
    assert c0 is not None
    gi, gh = _gates(rnn, layer, d, x, prev)  # (n, T, 4H) each
    i, f, g, o = (gi + gh).chunk(4, 2)  # 4 × (n, T, H)
    i, f, o, g = i.sigmoid(), f.sigmoid(), o.sigmoid(), g.tanh()
    ig, fs = (i * g).unbind(1), f.unbind(1)  # T × (n, H): one op each, not T slices
    state = c0  # (n, H)
    cs = list(ig)  # T × (n, H), filled in the direction's time order
    order = range(len(cs)) if d == 0 else range(len(cs) - 1, -1, -1)
    for t in order:
        state = cs[t] = torch.addcmul(ig[t], fs[t], state)  # f c + i g
    c = torch.stack(cs, 1)  # (n, T, H)
    W_hh = getattr(rnn, f"weight_hh{_suffix(layer, d)}")
    return _LSTMCells(prev, i, f, g, o, c, _previous(c, c0, d == 1), W_hh)


@dataclass
class _GRUCells:
    """One layer and direction of a GRU, batch first, in time order: its previous states,
    update gate, the coefficients of its gate gradients, and its recurrent weight."""

    prev: Tensor  # h_{t-1} (h_{t+1} in the reverse direction), (n, T, H)
    z: Tensor  # (n, T, H)
    K_gi: Tensor  # (n, T, 3H): dgi_t = K_gi_t ⊙ [dh_t, dh_t, dh_t]
    K_gh: Tensor  # (n, T, 3H): dgh_t = K_gh_t ⊙ [dh_t, dh_t, dh_t]
    W_hh: Tensor  # (3H, H)

    def backward(
        self, Gh: Tensor | None, g_hn: Tensor | None, g_cn: Tensor | None, reverse: bool
    ) -> tuple[Tensor, Tensor]:
        """``dgi``, ``dgh`` (n, T, 3H), given the gradient ``Gh`` (n, T, H) at the states
        and ``g_hn`` at the final state: ``dh_t = G_t + dh_{t+1} z_{t+1} + dgh_{t+1} W_hh``."""
        n, T, H = self.z.shape
        Ks = self.K_gh.view(n, T, 3, H).unbind(1)  # T × (n, 3, H)
        zs = self.z.unbind(1)  # T × (n, H)
        Ghs = None if Gh is None else Gh.unbind(1)  # T × (n, H)
        steps = _steps(T, reverse)
        dh = _first(self.prev, g_hn, Ghs, steps[0][0])  # (n, H)
        dhs = list(zs)  # T × (n, H), filled below
        for t, after in steps:
            dhs[t] = dh
            if after is None:
                break
            dgh = (Ks[t] * dh[:, None]).view(n, 3 * H)  # (n, 3H): K ⊙ [dh, dh, dh]
            # dh z, plus the next step's G where there is one: (n, H)
            carry = dh * zs[t] if Ghs is None else torch.addcmul(Ghs[after], dh, zs[t])
            dh = torch.addmm(carry, dgh, self.W_hh)  # (n, H)
        dh3 = torch.stack(dhs, 1).repeat(1, 1, 3)  # (n, T, 3H)
        return self.K_gi * dh3, self.K_gh * dh3


def _gru_cells(
    rnn: nn.RNNBase, layer: int, d: int, x: Tensor, hs: Tensor, prev: Tensor, c0: Tensor | None
) -> _GRUCells:
    """The gates of one direction from its input ``x`` and previous states ``prev``, and
    the derivatives of each state by its gates' pre-activations:

        r = σ(gi_r + gh_r),   z = σ(gi_z + gh_z),   ñ = tanh(gi_n + r gh_n)
        h = (1 − z) ñ + z h_{t−1}
        ∂h/∂(gi_n + r gh_n) = (1 − z)(1 − ñ²) = a,   ∂h/∂gh_n = a r
        ∂h/∂(gi_r + gh_r) = a gh_n r (1 − r),      ∂h/∂(gi_z + gh_z) = (h_{t−1} − ñ) z (1 − z)"""
    gi, gh = _gates(rnn, layer, d, x, prev)  # (n, T, 3H) each
    gi_r, gi_z, gi_n = gi.chunk(3, 2)  # 3 × (n, T, H)
    gh_r, gh_z, gh_n = gh.chunk(3, 2)  # 3 × (n, T, H)
    r, z = (gi_r + gh_r).sigmoid(), (gi_z + gh_z).sigmoid()  # (n, T, H) each
    cand = (gi_n + r * gh_n).tanh()  # (n, T, H)
    a = (1 - z) * (1 - cand * cand)  # (n, T, H)
    k_r = a * gh_n * r * (1 - r)  # (n, T, H)
    k_z = (prev - cand) * z * (1 - z)  # (n, T, H)
    K_gi = torch.cat([k_r, k_z, a], 2)  # (n, T, 3H)
    K_gh = torch.cat([k_r, k_z, a * r], 2)  # (n, T, 3H)
    return _GRUCells(prev, z, K_gi, K_gh, getattr(rnn, f"weight_hh{_suffix(layer, d)}"))


@dataclass
class _RNNCells:
    """One layer and direction of an Elman RNN, batch first, in time order: its previous
    states, the derivative of its activation at each step, and its recurrent weight."""

    prev: Tensor  # (n, T, H)
    slope: Tensor  # (n, T, H): 1 − h² (tanh) or [h > 0] (relu)
    W_hh: Tensor  # (H, H)

    def backward(
        self, Gh: Tensor | None, g_hn: Tensor | None, g_cn: Tensor | None, reverse: bool
    ) -> tuple[Tensor, Tensor]:
        """The pre-activation gradients ``dz`` (n, T, H) (``dgi = dgh = dz``):
        ``dz_t = (G_t + dz_{t+1} W_hh) ⊙ act′``."""
        slopes = self.slope.unbind(1)  # T × (n, H)
        Ghs = None if Gh is None else Gh.unbind(1)  # T × (n, H)
        steps = _steps(len(slopes), reverse)
        dh = _first(self.prev, g_hn, Ghs, steps[0][0])  # (n, H)
        dzs = list(slopes)  # T × (n, H), filled below
        for t, after in steps:
            dz = dzs[t] = dh * slopes[t]  # (n, H)
            if after is None:
                break
            # dz W_hh, plus the next step's G where there is one: (n, H)
            dh = torch.mm(dz, self.W_hh) if Ghs is None else torch.addmm(Ghs[after], dz, self.W_hh)
        dz = torch.stack(dzs, 1)  # (n, T, H)
        return dz, dz


def _rnn_cells(
    rnn: nn.RNNBase, layer: int, d: int, x: Tensor, hs: Tensor, prev: Tensor, c0: Tensor | None
) -> _RNNCells:
    """The activation's derivative from the states ``hs`` themselves (no gates needed)."""
    slope = 1 - hs * hs if rnn.mode == "RNN_TANH" else (hs > 0).to(hs.dtype)  # (n, T, H)
    W_hh = getattr(rnn, f"weight_hh{_suffix(layer, d)}")
    return _RNNCells(prev, slope, W_hh)


_CELLS: dict[str, Callable[..., _Cells]] = {
    "LSTM": _lstm_cells,
    "GRU": _gru_cells,
    "RNN_TANH": _rnn_cells,
    "RNN_RELU": _rnn_cells,
}


def _previous(seq: Tensor, initial: Tensor, reverse: bool) -> Tensor:
    """``(n, T, H)``: each step's previous value of ``seq`` (n, T, H) in the direction's
    time order, ``initial`` (n, H) before the first step."""
    first = initial[:, None]  # (n, 1, H)
    return torch.cat([seq[:, 1:], first], 1) if reverse else torch.cat([first, seq[:, :-1]], 1)


def _pieces(
    module: nn.Module, inputs: tuple[Any, ...], G: Any
) -> list[tuple[_Piece, Tensor, Tensor]]:
    """``(piece, A (n, T, d_in), G (n, T, d_out))`` for every Linear map with a trainable
    parameter."""
    return _prepare(module, inputs, G)[0]


def _unpack(inputs: tuple[Any, ...]) -> tuple[tuple[Any, ...], dict[tuple[int, int], Tensor], Any]:
    """The call's own arguments, the states :func:`rnn_inner` read from the graph (keyed
    ``(layer, direction)``; none where it read none) and the call's output (None without)."""
    output = None
    if inputs and isinstance(inputs[-1], Output):
        output, inputs = inputs[-1].value, inputs[:-1]
    states: dict[tuple[int, int], Tensor] = {}
    if inputs and isinstance(inputs[-1], Taken):
        states, inputs = inputs[-1].value, inputs[:-1]
    return inputs, states, output


def _prepare(
    module: nn.Module, inputs: tuple[Any, ...], G: Any, input_grad: bool = False
) -> tuple[list[tuple[_Piece, Tensor, Tensor]], Tensor | None]:
    """:func:`_pieces`, and with ``input_grad`` the gradient at the input (n, T, d_in)
    from the backward by hand (:func:`_by_hand`), which must apply."""
    inputs, states, output = _unpack(inputs)
    rnn = _check(module, inputs)
    pieces = []
    for layer in range(rnn.num_layers):
        for direction in range(2 if rnn.bidirectional else 1):
            s = _suffix(layer, direction)
            maps = [("ih", "gi" if rnn.mode == "GRU" else "gh", "x"), ("hh", "gh", "h")]
            for kind, step, value in maps:
                w, b = f"weight_{kind}{s}", f"bias_{kind}{s}"
                bias = getattr(rnn, b) if rnn.bias else None
                pieces.append(_Piece(getattr(rnn, w), bias, (w, b), f"{step}{s}", f"{value}{s}"))
            if rnn.proj_size:
                w = f"weight_hr{s}"
                pieces.append(_Piece(getattr(rnn, w), None, (w, None), f"r{s}", f"m{s}"))
    for p in pieces:
        if p.bias is not None and not p.bias.requires_grad:
            p.bias = None  # skip its work
    pieces = [p for p in pieces if p.weight.requires_grad or p.bias is not None]
    if not pieces and not input_grad:
        return [], None
    fast = _by_hand(rnn, inputs, G, states, input_grad, output) if _FUSED else None
    if fast is not None:
        values, steps, below = fast
        return [(p, values[p.value], steps[p.step]) for p in pieces], below
    if input_grad:
        raise RuntimeError(f"{type(module).__name__}: no backward by hand for this call")
    u = _unroll(module, inputs)
    keys = list(dict.fromkeys(p.step for p in pieces))  # each step gradient once
    targets = [t for k in keys for t in u.steps[k]]  # T per key
    with torch.enable_grad():
        inner = _inner(rnn, inputs, G, u)  # ⟨outputs, G⟩, ()
        if inner is None:  # no gradient reached the outputs
            grads: tuple[Tensor, ...] = tuple(torch.zeros_like(t) for t in targets)
        else:
            grads = torch.autograd.grad(inner, targets, allow_unused=True, materialize_grads=True)
    T = u.out.shape[1]
    d = {k: torch.stack(grads[i * T : (i + 1) * T], 1) for i, k in enumerate(keys)}  # (n, T, ·)
    return [(p, u.values[p.value], d[p.step]) for p in pieces], None


def _split_able(module: nn.Module, inputs: tuple[Any, ...]) -> bool:
    """Whether :func:`_split_run` gives the input's gradient: a padded input that needs
    one, no initial state that needs one, weights that are the module's own parameters
    (not parametrized), and the backward by hand (no projection, one precision)."""
    inputs = _unpack(inputs)[0]
    rnn = cast(nn.RNNBase, module)
    x, rest = inputs[0], tree_flatten(inputs[1:])[0]  # the initial state in any container
    return (
        _FUSED
        and rnn.mode in _MODES
        and not (rnn.training and rnn.dropout > 0 and rnn.num_layers > 1)
        and isinstance(x, Tensor)
        and x.dim() == 3
        and x.requires_grad
        and _by_hand_takes(rnn, x)
        and not any(isinstance(t, Tensor) and t.requires_grad for t in rest)
        # its own parameters: not parametrized, nor tensors computed in the graph
        and all(isinstance(rnn._parameters.get(k), nn.Parameter) for k in rnn._flat_weights_names)
    )


def _split_run(module: nn.Module, inputs: tuple[Any, ...], G: Any) -> tuple[Any, Tensor | None]:
    """:func:`_pieces`, and the gradient at the input in its own layout: ``Σ_directions
    dgi W_ih`` of the first layer."""
    pieces, below = _prepare(module, inputs, G, input_grad=True)  # below: (n, T, d_in)
    if below is not None and not cast(nn.RNNBase, module).batch_first:
        below = below.transpose(0, 1)  # (T, n, d_in)
    return pieces, below


def _named(piece: _Piece, result: dict[str, Tensor]) -> dict[str, Tensor]:
    weight, bias = piece.names
    out = {weight: result["weight"]} if "weight" in result else {}
    if bias is not None and "bias" in result:
        out[bias] = result["bias"]
    return out


def _as_linear(piece: _Piece) -> nn.Module:
    return cast(nn.Module, piece)  # linear.py reads .weight and .bias only


def rnn_grads(module: nn.Module, inputs: tuple[Any, ...], G: Any) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for piece, A, Gp in prepared(_pieces, module, inputs, G):  # (n, T, d_in), (n, T, d_out)
        out |= _named(piece, linear_grads(_as_linear(piece), (A,), Gp))
    return out


def rnn_sq_norms(module: nn.Module, inputs: tuple[Any, ...], G: Any) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for piece, A, Gp in prepared(_pieces, module, inputs, G):  # (n, T, d_in), (n, T, d_out)
        out |= _named(piece, linear_sq_norms(_as_linear(piece), (A,), Gp))
    return out


def rnn_weighted_sum(
    module: nn.Module, inputs: tuple[Any, ...], G: Any, coef: Tensor
) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for piece, A, Gp in prepared(_pieces, module, inputs, G):  # (n, T, d_in), (n, T, d_out)
        out |= _named(piece, linear_weighted_sum(_as_linear(piece), (A,), Gp, coef))
    return out


RNN, LSTM, GRU = (
    register_rule(
        cls,
        Rule(
            rnn_grads,
            rnn_sq_norms,
            rnn_weighted_sum,
            raw_layout=True,
            prepare=_pieces,
            inner=rnn_inner,
            output=True,
            split=Split(_split_able, _split_run),
        ),
    )
    for cls in (nn.RNN, nn.LSTM, nn.GRU)
)
