"""``nn.MultiheadAttention`` (its own rule), Transformer encoders built on it, and custom
attention on ``F.scaled_dot_product_attention`` (Linear rule), against the per-example loop."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import indigrad
from indigrad.rules import attention

E, H, N, L, S = 8, 2, 3, 4, 5  # embed dim, heads, batch, query length, key length


@dataclass(frozen=True)
class Cfg:
    """One way of building and calling an ``nn.MultiheadAttention``."""

    name: str
    batch_first: bool = True
    kv: str = "self"  # "self": q is k is v; "kv": k is v (cross); "qkv": three tensors
    kdim: int | None = None  # with vdim: separate q/k/v projection weights
    vdim: int | None = None
    bias: bool = True
    add_bias_kv: bool = False
    add_zero_attn: bool = False
    kpm: str | None = None  # key_padding_mask: "bool" or "float"
    mask: str | None = None  # attn_mask: "2d_bool", "2d_float", "3d_bool", "3d_float", "causal"
    is_causal: bool = False
    need_weights: bool = False
    weights_loss: bool = False  # the attention weights enter the losses
    output_loss: bool = True  # the attention output enters the losses
    average: bool = True
    keywords: bool = True  # call with keywords (else positional, trailing defaults omitted)
    key_len: int = S  # of key and value when they are not the query

    @property
    def S(self) -> int:  # the key length the layer sees
        return L if self.kv == "self" else self.key_len


CFGS = [
    Cfg("self"),
    Cfg("self_seq_first", batch_first=False),
    Cfg("cross_kv", kv="kv"),
    Cfg("cross_kv_seq_first", kv="kv", batch_first=False),
    Cfg("cross_qkv", kv="qkv"),
    Cfg("cross_qkv_key_len_L", kv="qkv", key_len=L),  # inputs alike in shape, not the same
    Cfg("separate_kdim_vdim", kv="qkv", kdim=5, vdim=3),
    Cfg("separate_seq_first", kv="qkv", kdim=5, vdim=3, batch_first=False),
    Cfg("no_bias", bias=False),
    Cfg("no_bias_separate", kv="qkv", kdim=5, vdim=6, bias=False),
    Cfg("bias_kv", add_bias_kv=True),
    Cfg("bias_kv_seq_first", add_bias_kv=True, batch_first=False, kv="kv"),
    Cfg("zero_attn", add_zero_attn=True),
    Cfg(
        "bias_kv_zero_attn_masks", add_bias_kv=True, add_zero_attn=True, kpm="bool", mask="3d_bool"
    ),
    Cfg("kpm_bool", kpm="bool", kv="kv"),
    Cfg("kpm_float", kpm="float", mask="2d_float"),
    Cfg("kpm_seq_first", kpm="bool", batch_first=False),
    Cfg("mask_2d_bool", mask="2d_bool", kv="qkv"),
    Cfg("mask_2d_float", mask="2d_float"),
    Cfg("mask_3d_bool", mask="3d_bool", kv="kv"),
    Cfg("mask_3d_float_seq_first", mask="3d_float", batch_first=False, kv="kv"),
    Cfg("kpm_and_mask_2d", kpm="bool", mask="2d_bool", kv="kv"),
    Cfg("causal", mask="causal", is_causal=True),  # SDPA's is_causal, the mask is not read
    Cfg("causal_need_weights", mask="causal", is_causal=True, need_weights=True),
    Cfg("causal_kpm", mask="causal", is_causal=True, kpm="float"),
    Cfg(
        "causal_bias_kv_zero_attn",
        mask="causal",
        is_causal=True,
        add_bias_kv=True,
        add_zero_attn=True,
    ),
    Cfg("causal_mask_only", mask="causal"),
    Cfg("weights_unused", need_weights=True),
    Cfg("weights_in_loss", need_weights=True, weights_loss=True, kv="kv"),
    Cfg("weights_per_head", need_weights=True, weights_loss=True, average=False),
    Cfg(
        "weights_per_head_seq_first",
        need_weights=True,
        weights_loss=True,
        average=False,
        batch_first=False,
        kv="qkv",
        kdim=5,
        vdim=3,
    ),
    Cfg("weights_only", need_weights=True, weights_loss=True, output_loss=False, add_bias_kv=True),
    Cfg("weights_only_self", need_weights=True, weights_loss=True, output_loss=False),
    Cfg(
        "weights_masked",
        need_weights=True,
        weights_loss=True,
        kpm="float",
        mask="2d_float",
        add_zero_attn=True,
    ),
    Cfg("positional", keywords=False, kv="kv"),
    Cfg("positional_kpm", keywords=False, kpm="bool", batch_first=False),
]
BY_NAME = {c.name: c for c in CFGS}


def _mha(cfg: Cfg, dropout: float = 0.0) -> nn.MultiheadAttention:
    return nn.MultiheadAttention(
        E,
        H,
        dropout=dropout,
        bias=cfg.bias,
        add_bias_kv=cfg.add_bias_kv,
        add_zero_attn=cfg.add_zero_attn,
        kdim=cfg.kdim,
        vdim=cfg.vdim,
        batch_first=cfg.batch_first,
    )


class AttnNet(nn.Module):
    """MultiheadAttention then a Linear head; batch-first inputs, whatever the layer's layout."""

    def __init__(self, cfg: Cfg, dropout: float = 0.0) -> None:
        super().__init__()
        self.cfg = cfg
        self.attn = _mha(cfg, dropout)
        self.head = nn.Linear(E, 3)
        with torch.no_grad():  # nonzero biases, so that their gradients are exercised
            for p in self.attn.parameters():
                if p.dim() == 1:
                    p.uniform_(-0.5, 0.5)

    def forward(
        self, x: Tensor, k: Tensor, v: Tensor, kpm: Tensor, mask: Tensor, mask2d: Tensor
    ) -> Tensor:
        cfg = self.cfg
        key = x if cfg.kv == "self" else k[:, : cfg.S]
        value = key if cfg.kv in ("self", "kv") else v[:, : cfg.S]
        if not cfg.batch_first:
            x, key, value = (t.transpose(0, 1) for t in (x, key, value))
            if cfg.kv == "self":
                key = value = x
            elif cfg.kv == "kv":
                value = key
        pad = _kpm(cfg, kpm)
        attn_mask = _attn_mask(cfg, mask if cfg.mask and cfg.mask.startswith("3d") else mask2d)
        if cfg.keywords:
            y, w = self.attn(
                x,
                key,
                value,
                key_padding_mask=pad,
                need_weights=cfg.need_weights,
                attn_mask=attn_mask,
                average_attn_weights=cfg.average,
                is_causal=cfg.is_causal,
            )
        else:
            y, w = self.attn(x, key, value) if pad is None else self.attn(x, key, value, pad)
        if not cfg.batch_first:
            y = y.transpose(0, 1)  # (n, L, E)
        losses = self.head(y).sin().sum((1, 2)) if cfg.output_loss else 0  # (n,)
        if cfg.weights_loss:  # weights are batch first: (n, L, S') or (n, h, L, S')
            losses = losses + (w.cos() * torch.arange(w.shape[-1]).to(w)).flatten(1).sum(1)
        return losses


def _kpm(cfg: Cfg, kpm: Tensor) -> Tensor | None:
    if cfg.kpm is None:
        return None
    kpm = kpm[:, : cfg.S]  # (n, S)
    pad = kpm > 0.7  # key 0 never masked
    pad[:, 0] = False
    return pad if cfg.kpm == "bool" else pad.to(kpm.dtype) * -3.0 + kpm


def _attn_mask(cfg: Cfg, mask: Tensor) -> Tensor | None:
    """``mask``: (n, h, L, S) uniform in [0, 1) for a 3-D mask (batch first, so that the loop
    slices it), or (L, S) for a 2-D mask, shared by all examples."""
    if cfg.mask is None:
        return None
    if cfg.mask == "causal":
        return nn.Transformer.generate_square_subsequent_mask(L, dtype=mask.dtype)  # (L, L)
    m = mask[..., : cfg.S]  # (n, h, L, S) or (L, S)
    if cfg.mask.endswith("bool"):
        m = m > 0.6
        m[..., 0] = False  # no row fully masked
    else:
        m = m * 2 - 1
    return m.flatten(0, 1) if cfg.mask.startswith("3d") else m  # (n h, L, S) or (L, S)


def _build(cfg: Cfg, dtype=torch.float64, n: int = N, seed: int = 0, dropout: float = 0.0):
    torch.manual_seed(seed)
    model = AttnNet(cfg, dropout).to(dtype).eval()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, L, E, generator=g, dtype=dtype)
    k = torch.randn(n, S, cfg.kdim or E, generator=g, dtype=dtype)
    v = torch.randn(n, S, cfg.vdim or E, generator=g, dtype=dtype)
    kpm = torch.rand(n, S, generator=g, dtype=dtype)
    mask = torch.rand(n, H, L, S, generator=g, dtype=dtype)
    mask2d = torch.rand(L, S, generator=g, dtype=dtype)
    return model, (x, k, v, kpm, mask, mask2d)


@pytest.mark.parametrize("cfg", CFGS, ids=lambda c: c.name)
def test_mha_float64(cfg):
    model, batch = _build(cfg)
    indigrad.testing.check(model, model, *batch)


@pytest.mark.parametrize(
    "name", ["self", "separate_seq_first", "weights_per_head", "bias_kv_zero_attn_masks"]
)
def test_mha_float32(name):
    model, batch = _build(BY_NAME[name], torch.float32)
    # float32 tolerances of torch.testing.assert_close (rtol 1.3e-6, atol 1e-5)
    indigrad.testing.check(model, model, *batch)


@pytest.mark.parametrize("name", ["self", "cross_kv_seq_first", "weights_in_loss", "causal"])
def test_mha_train_mode_without_dropout(name):
    model, batch = _build(BY_NAME[name])
    indigrad.testing.check(model.train(), model, *batch)


def test_mha_eval_mode_with_dropout():
    model, batch = _build(BY_NAME["kpm_bool"], dropout=0.5)
    indigrad.testing.check(model.eval(), model, *batch)


def test_mha_dropout_in_training_mode_raises_where_the_rule_recomputes():
    model, batch = _build(BY_NAME["bias_kv_seq_first"], dropout=0.1)
    model.train()
    with indigrad.capture(model) as cap, pytest.raises(RuntimeError, match=r"dropout=0\.0"):
        cap.norms(model(*batch))


def _reads_the_graph(cfg: Cfg) -> bool:
    """The configurations whose gradients the rule reads from the graph (no recompute):
    all but those with ``bias_k``/``bias_v`` or zero attention."""
    return not (cfg.add_bias_kv or cfg.add_zero_attn)


@pytest.mark.parametrize("cfg", CFGS, ids=lambda c: c.name)
def test_attention_is_read_from_the_graph(cfg, monkeypatch):
    """Self-, cross- and three-input attention, packed or separate projection weights, are
    not recomputed (the forward would raise) and still match the loop; the forms with
    ``bias_k``/``bias_v`` or zero attention recompute."""
    recomputed = []
    original = attention._forward

    def forward(mha, inputs):
        recomputed.append(cfg.name)
        if _reads_the_graph(cfg):
            raise AssertionError("recomputed")
        return original(mha, inputs)

    monkeypatch.setattr(attention, "_forward", forward)
    model, batch = _build(cfg)
    indigrad.testing.check(model, model, *batch)
    assert bool(recomputed) != _reads_the_graph(cfg)


@pytest.mark.parametrize("name", ["self", "cross_kv_seq_first", "separate_kdim_vdim"])
def test_attention_with_dropout_in_training_mode(name):
    """Read from the graph, the attention's own dropout masks are those of the forward:
    the per-example gradients sum to the batch gradient of the same forward."""
    model, batch = _build(BY_NAME[name], dropout=0.3)
    model.train()
    torch.manual_seed(5)
    with indigrad.capture(model) as cap:
        per = cap.backward(model(*batch))
        grads, norms = per.grads(), per.norms()
    torch.manual_seed(5)
    model(*batch).sum().backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(grads[k].sum(0), p.grad, msg=k)
    torch.testing.assert_close(norms, indigrad.testing.norms_of(grads))
    torch.manual_seed(6)  # another mask: another gradient, so the masks were not all-ones
    with indigrad.capture(model) as cap:
        other = cap.grads(model(*batch))
    key = "attn.out_proj.weight"
    assert not torch.allclose(other[key], grads[key])


def test_mha_batch_of_one():
    model, batch = _build(BY_NAME["kpm_and_mask_2d"], n=1)
    indigrad.testing.check(model, model, *batch)


def test_mha_seq_first_model_with_batch_dim_1():
    """A sequence-first model: the head sees (L, n, E), the attention its own layout."""
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(E, H, add_bias_kv=True).double()
    head = nn.Linear(E, 3).double()
    model = nn.ModuleList([attn, head])
    x = torch.randn(L, N, E, dtype=torch.float64)
    mask = torch.randn(L, L, dtype=torch.float64)

    def losses(x):
        y, w = attn(x, x, x, attn_mask=mask)  # (L, n, E), (n, L, L+1)
        return head(y).sin().sum((0, 2)) + w.square().sum((1, 2))  # (n,)

    indigrad.testing.check(model, losses, x, batch_dim=1)


def test_mha_applied_twice_and_self_identity_not_required():
    """One layer called twice (uses add up); q, k, v equal but distinct tensors."""
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(E, H, batch_first=True).double()
    model = nn.ModuleList([attn, nn.Linear(E, 2).double()])
    x = torch.randn(N, L, E, dtype=torch.float64)

    def losses(x):
        y = attn(x, x.clone(), x.clone(), need_weights=False)[0]
        y = attn(y.tanh(), y.tanh(), y.tanh(), need_weights=False)[0]
        return model[1](y).sin().sum((1, 2))

    indigrad.testing.check(model, losses, x)


@pytest.mark.parametrize(
    "frozen",
    ["in_proj_weight", "in_proj_bias", "out_proj", "bias_k", "q_proj_weight", "all_but_bias_v"],
)
def test_mha_frozen_parameters(frozen):
    separate = frozen == "q_proj_weight"
    cfg = Cfg(
        "frozen",
        kv="qkv" if separate else "self",
        kdim=5 if separate else None,
        vdim=3 if separate else None,
        add_bias_kv=True,
    )
    model, batch = _build(cfg)
    if frozen == "all_but_bias_v":
        model.requires_grad_(False)
        model.attn.bias_v.requires_grad_(True)
    elif frozen == "out_proj":
        model.attn.out_proj.requires_grad_(False)
    else:
        getattr(model.attn, frozen).requires_grad_(False)
    indigrad.testing.check(model, model, *batch)


@pytest.mark.parametrize("how", ["add_zero_attn", "add_bias_kv", "frozen_in_proj"])
def test_unused_per_head_weights_where_the_rule_recomputes(how):
    # The per-head weights are a view of the softmax that the output is computed from:
    # returned and unused, they receive no gradient of their own (the softmax's is the
    # output's, which the rule takes through its own backward).
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(
        4,
        2,
        batch_first=True,
        add_zero_attn=how == "add_zero_attn",
        add_bias_kv=how == "add_bias_kv",
    ).double()
    if how == "frozen_in_proj":
        mha.in_proj_weight.requires_grad_(False)

    def losses(x):
        out, _weights = mha(x, x, x, average_attn_weights=False)
        return out.sin().sum((1, 2))

    indigrad.testing.check(mha, losses, torch.randn(3, 4, 4, dtype=torch.float64))


# -- the recomputed forward is the module's ----------------------------------------------


_KEYWORDS = ("key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal")


@pytest.mark.parametrize("cfg", CFGS, ids=lambda c: c.name)
def test_recomputed_forward_matches_module(cfg):
    cfg = replace(cfg, need_weights=True, keywords=True)  # so that the weights come out
    if cfg.is_causal and cfg.kpm is None:
        cfg = replace(cfg, need_weights=False)  # the SDPA causal path returns no weights
    model, batch = _build(cfg)
    calls: list[tuple[Any, ...]] = []

    def hook(module, args, kwargs, out):
        calls.append((args, kwargs, out))

    handle = model.attn.register_forward_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(*batch)
    handle.remove()
    (args, kwargs, (y, w)), mha = calls[0], model.attn
    inputs = (*args, *(kwargs[k] for k in _KEYWORDS))  # the rule's positional tuple
    core = attention._forward(mha, inputs)
    y_re = F.linear(core.O, mha.out_proj.weight, mha.out_proj.bias)  # (n, L, E)
    if not cfg.batch_first:
        y_re = y_re.transpose(0, 1)
    torch.testing.assert_close(y_re, y)
    if w is not None:
        torch.testing.assert_close(core.P.mean(1) if cfg.average else core.P, w)


# -- fast paths agree with the materialised gradients ---------------------------------------


def _rule_inputs(cfg: Cfg, T: int, dtype=torch.float64):
    torch.manual_seed(0)
    mha = _mha(cfg).to(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, T, E, generator=g, dtype=dtype)
    key = x if cfg.kv == "self" else torch.randn(N, T + 1, cfg.kdim or E, generator=g, dtype=dtype)
    value = (
        key if cfg.kv != "qkv" else torch.randn(N, T + 1, cfg.vdim or E, generator=g, dtype=dtype)
    )
    if not cfg.batch_first:
        x, key, value = (t.transpose(0, 1) for t in (x, key, value))
        key = x if cfg.kv == "self" else key
        value = key if cfg.kv != "qkv" else value
    y, w = mha(x, key, value, need_weights=True, average_attn_weights=cfg.average)
    G = (
        torch.randn(y.shape, generator=g, dtype=dtype),
        torch.randn(w.shape, generator=g, dtype=dtype),
    )
    return mha, (x, key, value, None, True, None, cfg.average, False), G


@pytest.mark.parametrize("T", [3, 12], ids=["ghost", "materialise"])
@pytest.mark.parametrize(
    "name", ["self", "cross_kv_seq_first", "separate_kdim_vdim", "bias_kv", "weights_per_head"]
)
def test_fast_sq_norms_and_weighted_sum_agree_with_grads(name, T, monkeypatch):
    cfg = BY_NAME[name]
    mha, inputs, G = _rule_inputs(cfg, T)
    with torch.no_grad():
        grads = attention.attention_grads(mha, inputs, G)
        branches = []  # ghost: bmm(A, Aᵀ) on one tensor; materialised: bmm(Gᵀ, A)
        real = torch.bmm
        spy = lambda a, b, **kw: branches.append(a.data_ptr() == b.data_ptr()) or real(a, b, **kw)  # noqa: E731
        monkeypatch.setattr(torch, "bmm", spy)
        fast = attention.attention_sq_norms(mha, inputs, G)
        monkeypatch.undo()
        coef = torch.rand(N, dtype=torch.float64)
        ws = attention.attention_weighted_sum(mha, inputs, G, coef)
    params = dict(mha.named_parameters())
    assert sorted(grads) == sorted(params)
    for k, g in grads.items():
        assert g.shape == (N, *params[k].shape), k
        torch.testing.assert_close(fast[k], g.flatten(1).square().sum(1), msg=k)
        torch.testing.assert_close(ws[k], torch.einsum("n,n...->...", coef, g), msg=k)
    if T == 3:
        assert True in branches, branches  # ghost Grams (some layers may still materialise)
    else:
        assert branches and True not in branches, branches  # materialised only


def test_self_attention_is_one_linear_map():
    """``query is key is value``: the packed in-projection is one (3E, E) map, not three."""
    mha, inputs, G = _rule_inputs(BY_NAME["self"], 3)
    pieces, _ = attention._pieces(mha, inputs, G)
    assert [(p.weight, p.G.shape[-1]) for p in pieces] == [
        ("out_proj.weight", E),
        ("in_proj_weight", 3 * E),
    ]
    mha, inputs, G = _rule_inputs(BY_NAME["cross_kv"], 3)
    pieces, _ = attention._pieces(mha, inputs, G)
    assert [p.G.shape[-1] for p in pieces] == [E, E, 2 * E]


def test_unbatched_input_raises():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H).double()
    x = torch.randn(L, E, dtype=torch.float64)
    with indigrad.capture(mha) as cap, pytest.raises(RuntimeError, match="unbatched"):
        cap.norms(mha(x, x, x)[0].sum(1))


# -- Transformer encoders ---------------------------------------------------------------------


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("mode", ["train_dropout0", "eval_dropout"])
def test_transformer_encoder(norm_first, mode):
    torch.manual_seed(0)
    dropout = 0.0 if mode == "train_dropout0" else 0.2
    layer = nn.TransformerEncoderLayer(
        E, H, dim_feedforward=16, dropout=dropout, batch_first=True, norm_first=norm_first
    )
    encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    model = nn.ModuleDict({"enc": encoder, "head": nn.Linear(E, 3)}).double()
    model.train(mode == "train_dropout0")
    x = torch.randn(N, L, E, dtype=torch.float64)
    pad = torch.zeros(N, L, dtype=torch.bool)
    pad[0, -1] = pad[2, -2:] = True
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)  # True: not attended

    def losses(x, pad):
        h = model["enc"](x, mask=causal, src_key_padding_mask=pad)
        return model["head"](h).sin().sum((1, 2))

    indigrad.testing.check(model, losses, x, pad)


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_decoder_with_dropout(batch_first, monkeypatch):
    """``nn.Transformer``: the decoder's cross-attention (key is value: the encoder's
    memory) is read from the graph like its self-attention, so dropout in training mode
    works; its per-example gradients sum to the batch gradient of the same forward, and
    in eval mode they match the loop."""
    from conftest import assert_sums_to_batch_gradient

    def recompute(mha, inputs):
        raise AssertionError("attention recomputed")

    monkeypatch.setattr(attention, "_forward", recompute)
    torch.manual_seed(0)
    transformer = nn.Transformer(
        E, H, 1, 1, dim_feedforward=16, dropout=0.2, batch_first=batch_first
    ).double()
    model = nn.ModuleDict({"t": transformer, "head": nn.Linear(E, 3).double()})
    src, tgt = torch.randn(N, S, E, dtype=torch.float64), torch.randn(N, L, E, dtype=torch.float64)
    if not batch_first:
        src, tgt = src.transpose(0, 1), tgt.transpose(0, 1)
    causal = nn.Transformer.generate_square_subsequent_mask(L, dtype=torch.float64)

    def losses(src, tgt):
        out = model["t"](src, tgt, tgt_mask=causal)  # (n, L, E) or (L, n, E)
        return model["head"](out).sin().sum(-1).sum(1 if batch_first else 0)

    bd = 0 if batch_first else 1
    model.train()
    if batch_first:
        assert_sums_to_batch_gradient(model, losses, src, tgt)
    model.eval()
    indigrad.testing.check(model, losses, src, tgt, batch_dim=bd)


# -- custom attention on F.scaled_dot_product_attention: the Linear rule alone ----------------


class SDPAttention(nn.Module):
    def __init__(self, causal: bool) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(E, E), nn.Linear(E, E), nn.Linear(E, E, bias=False)
        self.out = nn.Linear(E, E)
        self.causal = causal

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:  # x (n, T, E)
        def heads(t: Tensor) -> Tensor:
            return t.unflatten(2, (H, E // H)).transpose(1, 2)  # (n, h, T, D)

        o = F.scaled_dot_product_attention(
            heads(self.q(x)),
            heads(self.k(x)),
            heads(self.v(x)),
            attn_mask=mask,
            is_causal=self.causal,
        )  # (n, h, T, D)
        return self.out(o.transpose(1, 2).flatten(2))  # (n, T, E)


@pytest.mark.parametrize("how", ["causal", "bool_mask", "float_mask"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sdpa_custom_module(how, dtype):
    torch.manual_seed(0)
    attn = SDPAttention(causal=how == "causal")
    model = nn.ModuleDict({"attn": attn, "head": nn.Linear(E, 2)}).to(dtype)
    assert indigrad.lookup_rule(attn) is None and not any(p for p in attn.parameters(recurse=False))
    x = torch.randn(N, L, E, dtype=dtype)
    mask = torch.rand(N, 1, L, L, dtype=dtype)
    if how == "bool_mask":
        mask = mask > 0.5
        mask[..., 0] = True  # True = attend, for SDPA
    elif how == "causal":
        mask = None

    def losses(x, mask=None):
        return model["head"](attn(x, mask)).sin().sum((1, 2))

    batch = (x,) if mask is None else (x, mask)
    indigrad.testing.check(model, losses, *batch)
