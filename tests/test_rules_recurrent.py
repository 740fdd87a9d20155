"""nn.RNN, nn.LSTM, nn.GRU: every option against the per-example loop, the recomputed
recurrence against the module's own forward, and the rule's fast paths and errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import indigrad
from indigrad.rules import Output, linear, recurrent

N, T, D_IN, H, K = 4, 5, 3, 4, 3
SORTED, UNSORTED = [5, 4, 2, 1], [2, 5, 1, 4]  # lengths for enforce_sorted True / False


pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass(frozen=True)
class Config:
    """A recurrent layer, how it is called, and what the loss reads of its outputs."""

    name: str
    cls: type[nn.RNNBase]
    kwargs: dict[str, Any] = field(default_factory=dict)  # constructor options
    packed: str | None = None  # None, "sorted" (enforce_sorted=True) or "unsorted"
    h0: str | None = None  # None, "positional" or "keyword"
    readout: str = "both"  # "all" outputs, "last" output, final "state", or "both"

    def build(self, dtype: torch.dtype = torch.float64) -> tuple[Net, tuple[Any, ...]]:
        """The model and the batch ``(x, y, lengths, h0, c0)`` for ``check``."""
        torch.manual_seed(0)
        rnn = self.cls(D_IN, H, **self.kwargs)
        model = Net(rnn, self).to(dtype)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(N, T, D_IN, generator=g, dtype=dtype)  # (n, T, d_in) always batch first
        y = torch.randint(0, K, (N,), generator=g)
        lengths = None
        if self.packed is not None:
            lengths = torch.tensor(SORTED if self.packed == "sorted" else UNSORTED)
        h0 = c0 = None
        if self.h0 is not None:
            states = rnn.num_layers * (2 if rnn.bidirectional else 1)
            h_out = rnn.proj_size if isinstance(rnn, nn.LSTM) and rnn.proj_size else H
            h0 = torch.randn(N, states, h_out, generator=g, dtype=dtype)  # batch first
            if self.cls is nn.LSTM:
                c0 = torch.randn(N, states, H, generator=g, dtype=dtype)
        return model, (x, y, lengths, h0, c0)


class Net(nn.Module):
    """Recurrent layer, then a Linear head on its outputs and/or final states."""

    def __init__(self, rnn: nn.RNNBase, config: Config) -> None:
        super().__init__()
        self.rnn = rnn
        self.config = config
        dirs = 2 if rnn.bidirectional else 1
        h_out = rnn.proj_size if isinstance(rnn, nn.LSTM) and rnn.proj_size else rnn.hidden_size
        self.head = nn.Linear(dirs * h_out, K)
        self.dirs = dirs

    def call_rnn(
        self, x: Tensor, lengths: Tensor | None, h0: Tensor | None, c0: Tensor | None
    ) -> tuple[Any, Any, Tensor]:
        """``(input, output, padded output (n, T, D·H_out))`` of one call of the layer."""
        bf = self.rnn.batch_first
        inp: Any = x if bf else x.transpose(0, 1)
        if lengths is not None:
            sort = self.config.packed == "sorted"
            inp = pack_padded_sequence(inp, lengths, batch_first=bf, enforce_sorted=sort)
        hx: Any = None
        if h0 is not None:
            hx = h0.transpose(0, 1) if c0 is None else (h0.transpose(0, 1), c0.transpose(0, 1))
        if self.config.h0 == "keyword":
            out = self.rnn(inp, hx=hx)
        elif self.config.h0 == "positional":
            out = self.rnn(inp, hx)
        else:
            out = self.rnn(inp)
        seq = out[0]
        if isinstance(seq, PackedSequence):
            padded = pad_packed_sequence(seq, batch_first=True, total_length=x.shape[1])[0]
        else:
            padded = seq if bf else seq.transpose(0, 1)
        return inp, out, padded

    def forward(
        self,
        x: Tensor,
        lengths: Tensor | None = None,
        h0: Tensor | None = None,
        c0: Tensor | None = None,
    ) -> Tensor:
        _, (_, state), out = self.call_rnn(x, lengths, h0, c0)  # out (n, T, D·H_out)
        return self.read(out, state, lengths)

    def read(self, out: Tensor, state: Any, lengths: Tensor | None) -> Tensor:
        """Logits ``(n, K)`` from the padded outputs ``(n, T, D·H_out)`` and final states."""
        readout = self.config.readout
        n = out.shape[0]
        logits = torch.zeros(n, K, dtype=out.dtype)  # (n, K)
        if readout in ("all", "both"):
            logits = logits + self.head(out).tanh().mean(1)  # (n, K)
        if readout == "last":
            last = out.shape[1] - 1 if lengths is None else lengths - 1  # (n,) or int
            logits = logits + self.head(out[torch.arange(n), last])  # (n, K)
        if readout in ("state", "both"):
            h_n, c_n = state if isinstance(state, tuple) else (state, None)  # (L·D, n, ·)
            top = h_n[-self.dirs :].transpose(0, 1).flatten(1)  # (n, D·H_out)
            logits = logits + self.head(top)  # (n, K)
            if c_n is not None:
                logits = logits + c_n[-1, :, :K].sin()  # (n, K): G reaches c_n
        return logits


def _losses(model: Net) -> Any:
    def losses(x: Tensor, y: Tensor, lengths: Any, h0: Any, c0: Any) -> Tensor:
        return F.cross_entropy(model(x, lengths, h0, c0), y, reduction="none")  # (n,)

    return losses


def _variants(cls: type[nn.RNNBase], tag: str, *keep: int, **kw: Any) -> list[Config]:
    """Every option of ``cls`` at least once (the ``keep`` subset when given)."""
    layers2, bi, bf, no_bias = (
        {"num_layers": 2},
        {"bidirectional": True},
        {"batch_first": True},
        {"bias": False},
    )
    configs = [
        Config(tag, cls, kw),
        Config(f"{tag}-2layers-bi-h0_keyword", cls, {**kw, **layers2, **bi}, h0="keyword"),
        Config(f"{tag}-batch_first-no_bias-last", cls, {**kw, **bf, **no_bias}, readout="last"),
        Config(f"{tag}-bi-h0-outputs_only", cls, {**kw, **bi}, h0="positional", readout="all"),
        Config(f"{tag}-2layers-state_only", cls, {**kw, **layers2}, readout="state"),
        Config(f"{tag}-packed_sorted-2layers-no_bias", cls, {**kw, **layers2, **no_bias}, "sorted"),
        Config(
            f"{tag}-packed_unsorted-bi-bf-h0-last",
            cls,
            {**kw, **bi, **bf},
            "unsorted",
            "positional",
            "last",
        ),
        Config(
            f"{tag}-packed_unsorted-2layers-bi-h0",
            cls,
            {**kw, **layers2, **bi},
            "unsorted",
            "keyword",
        ),
    ]
    return [configs[i] for i in keep] if keep else configs


CONFIGS = [
    *_variants(nn.RNN, "rnn_tanh"),
    *_variants(nn.RNN, "rnn_relu", 0, 1, 7, nonlinearity="relu"),
    *_variants(nn.LSTM, "lstm"),
    *_variants(nn.LSTM, "lstm_proj", 0, 1, 2, 5, 6, proj_size=2),
    *_variants(nn.GRU, "gru"),
]
PACKED = [c for c in CONFIGS if c.packed is not None]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_float64_matches_loop(config):
    model, batch = config.build()
    indigrad.testing.check(model, _losses(model), *batch)


@pytest.mark.parametrize(
    "name",
    [
        "lstm_proj-2layers-bi-h0_keyword",
        "lstm-2layers-bi-h0_keyword",  # by the fused kernel and a backward by hand
        "gru-2layers-state_only",
        "rnn_tanh-batch_first-no_bias-last",
    ],
)
def test_float32_matches_loop(name):
    config = next(c for c in CONFIGS if c.name == name)
    model, batch = config.build(torch.float32)
    # float32 tolerances of torch.testing.assert_close (rtol 1.3e-6, atol 1e-5)
    indigrad.testing.check(model, _losses(model), *batch)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
def test_recomputed_recurrence_is_the_modules_forward(config):
    model, (x, _, lengths, h0, c0) = config.build()
    with torch.no_grad():
        inp, (_, state), out = model.call_rnn(x, lengths, h0, c0)
        hx: Any = None
        if h0 is not None:
            hx = h0.transpose(0, 1) if c0 is None else (h0.transpose(0, 1), c0.transpose(0, 1))
        unrolled = recurrent._unroll(model.rnn, (inp, hx))
    tight = {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(unrolled.out, out, **tight)
    h_n, c_n = state if isinstance(state, tuple) else (state, None)
    torch.testing.assert_close(unrolled.h_n, h_n, **tight)
    if c_n is not None:
        torch.testing.assert_close(unrolled.c_n, c_n, **tight)


def _rule_inputs(
    config: Config, model: Net, batch: tuple[Any, ...], output: bool = False
) -> tuple[Any, Any]:
    """``(inputs, G)`` as the framework hands them to the rule, G taken with autograd;
    with ``output``, the inputs end with the call's output (``Rule.output``)."""
    x, y, lengths, h0, c0 = batch
    inp, out, padded = model.call_rnn(x, lengths, h0, c0)
    seq, state = out
    losses = F.cross_entropy(model.read(padded, state, lengths), y, reduction="none")  # (n,)
    states = list(state) if isinstance(state, tuple) else [state]
    data = seq.data if isinstance(seq, PackedSequence) else seq
    grads = torch.autograd.grad(losses.sum(), [data, *states], allow_unused=True)
    g_seq: Any = grads[0]
    if isinstance(seq, PackedSequence):
        g_seq = PackedSequence(grads[0], seq.batch_sizes, seq.sorted_indices, seq.unsorted_indices)
    G = (g_seq, tuple(grads[1:]) if isinstance(state, tuple) else grads[1])
    hx = None
    if h0 is not None:
        hx = h0.transpose(0, 1) if c0 is None else (h0.transpose(0, 1), c0.transpose(0, 1))
    inputs = (inp,) if config.h0 is None else (inp, hx)
    if output:
        detached = (seq.detach(), tuple(t.detach() for t in states))
        inputs = (*inputs, Output(detached if isinstance(state, tuple) else detached[:1]))
    return inputs, G


BY_HAND = [c for c in CONFIGS if c.packed is None and "proj" not in c.name]


@pytest.mark.parametrize("top", ["run_again", "output"])
@pytest.mark.parametrize("config", BY_HAND, ids=lambda c: c.name)
def test_by_hand_matches_the_unrolled_recurrence(config, top, monkeypatch):
    """A layer's gate gradients by the fused kernel and a backward by hand are those of the
    recurrence unrolled under autograd, to rounding, and so are the Linear maps' inputs;
    the top layer's states run again or read from the call's output."""
    model, batch = config.build()
    inputs, G = _rule_inputs(config, model, batch, output=top == "output")
    runs = []
    run_layer = recurrent._run_layer
    monkeypatch.setattr(recurrent, "_run_layer", lambda *a: runs.append(1) or run_layer(*a))
    with torch.no_grad():
        fast = recurrent._pieces(model.rnn, inputs, G)
        monkeypatch.setattr(recurrent, "_FUSED", False)
        unrolled = recurrent._pieces(model.rnn, inputs, G)
    layers = model.rnn.num_layers
    assert len(runs) == (layers if top == "run_again" else layers - 1)
    assert [p.names for p, _, _ in fast] == [p.names for p, _, _ in unrolled]
    for (piece, A, Gp), (_, A_ref, G_ref) in zip(fast, unrolled, strict=True):
        torch.testing.assert_close(A, A_ref, rtol=1e-12, atol=1e-12, msg=str(piece.names))
        torch.testing.assert_close(Gp, G_ref, rtol=1e-10, atol=1e-12, msg=str(piece.names))


def test_every_mode_is_compared_by_hand():
    assert {c.cls for c in BY_HAND} == {nn.RNN, nn.LSTM, nn.GRU}
    assert any(c.kwargs.get("nonlinearity") == "relu" for c in BY_HAND)


READ = {
    "lstm": (nn.LSTM, torch.float32),  # one node per layer and direction
    "lstm-float64": (nn.LSTM, torch.float64),  # step by step, as a GRU
    "gru": (nn.GRU, torch.float32),
    "rnn": (nn.RNN, torch.float32),
}


@pytest.mark.parametrize("batch_first", [True, False], ids=["bf", "seq_first"])
@pytest.mark.parametrize("kind", READ)
def test_states_below_the_top_are_read_from_the_graph(kind, batch_first, monkeypatch):
    """On CPU the forward saves the states of every layer below the top (an LSTM's fused
    layer node, or the product of the layer above with ``W_ihᵀ``) and the top layer's are
    the call's output: the rule runs no layer again."""
    cls, dtype = READ[kind]
    torch.manual_seed(0)
    rnn = cls(3, 4, num_layers=3, bidirectional=True, batch_first=batch_first).to(dtype)
    x = torch.randn(5, 6, 3, dtype=dtype)  # (n, T, d) or (T, n, d)
    out, _ = rnn(x)
    found = recurrent.rnn_inner(rnn, out.grad_fn, [])
    if found is None:
        pytest.skip("this build's recurrent kernel saves no per-layer states")
    assert set(found.value) == {(0, 0), (0, 1), (1, 0), (1, 1)} and found.edges == ()
    T, n = (6, 5) if batch_first else (5, 6)
    for layer in (0, 1):  # its states: the output of the first layer + 1 layers
        below = cls(3, 4, num_layers=layer + 1, bidirectional=True, batch_first=batch_first)
        below.load_state_dict(rnn.state_dict(), strict=False)
        seq = below.to(dtype)(x)[0]
        seq = seq.transpose(0, 1) if batch_first else seq  # (T, n, 2H)
        for d in (0, 1):
            read = found.value[layer, d].reshape(T, n, 4)  # (T, n, H)
            torch.testing.assert_close(read, seq[..., d * 4 : (d + 1) * 4])

    def run_layer_again(*args):
        raise AssertionError("a layer was run again")

    monkeypatch.setattr(recurrent, "_run_layer", run_layer_again)
    bd = 0 if batch_first else 1
    indigrad.testing.check(rnn, lambda x: rnn(x)[0].sin().sum((1 - bd, 2)), x, batch_dim=bd)


@pytest.mark.parametrize("config", PACKED, ids=lambda c: c.name)
def test_packed_rule_matches_loop(config):
    """The rule on a PackedSequence call, G as the framework's output structure holds it."""
    model, batch = config.build()
    model.head.requires_grad_(False)
    ref = indigrad.testing.loop_grads(model.rnn, _losses(model), *batch)
    inputs, G = _rule_inputs(config, model, batch)
    coef = torch.rand(N, dtype=torch.float64)
    with torch.no_grad():
        grads = recurrent.rnn_grads(model.rnn, inputs, G)
        sq = recurrent.rnn_sq_norms(model.rnn, inputs, G)
        ws = recurrent.rnn_weighted_sum(model.rnn, inputs, G, coef)
        # the gradient of the packed output's data alone, or as a tuple of leaves
        leaves = (tuple(G[0]), G[1])
        alone = recurrent.rnn_grads(model.rnn, inputs, (G[0].data, G[1]))
        as_leaves = recurrent.rnn_grads(model.rnn, inputs, leaves)
    assert set(grads) == set(sq) == set(ws) == set(ref)
    for k, g in ref.items():
        torch.testing.assert_close(grads[k], g)
        torch.testing.assert_close(alone[k], g)
        torch.testing.assert_close(as_leaves[k], g)
        torch.testing.assert_close(sq[k], g.flatten(1).square().sum(1))
        torch.testing.assert_close(ws[k], torch.tensordot(coef, g, dims=1))


@pytest.mark.parametrize(
    "name", ["lstm_proj-packed_unsorted-bi-bf-h0-last", "gru-2layers-bi-h0_keyword", "rnn_tanh"]
)
def test_fast_paths_agree_with_materialised(name):
    config = next(c for c in CONFIGS if c.name == name)
    model, batch = config.build()
    inputs, G = _rule_inputs(config, model, batch)
    coef = torch.rand(N, dtype=torch.float64)
    with torch.no_grad():
        grads = recurrent.rnn_grads(model.rnn, inputs, G)
        sq = recurrent.rnn_sq_norms(model.rnn, inputs, G)
        ws = recurrent.rnn_weighted_sum(model.rnn, inputs, G, coef)
    names = {k for k, p in model.rnn.named_parameters()}
    assert set(grads) == set(sq) == set(ws) == names
    assert all(g.abs().sum() > 0 for g in grads.values())
    for k, g in grads.items():
        torch.testing.assert_close(sq[k], g.flatten(1).square().sum(1))
        torch.testing.assert_close(ws[k], torch.tensordot(coef, g, dims=1))


def test_ghost_and_materialised_branches_are_both_taken(monkeypatch):
    calls = []
    real = linear.linear_sq_norms

    def spy(module, inputs, G):
        A = inputs[0]  # (n, T, d_in)
        T, d_in, d_out = A.shape[1], A.shape[2], G.shape[2]
        calls.append("ghost" if T * (d_in + d_out) < d_in * d_out else "materialised")
        return real(module, inputs, G)

    monkeypatch.setattr(recurrent, "linear_sq_norms", spy)
    bmm = []
    real_bmm = torch.bmm
    monkeypatch.setattr(
        torch, "bmm", lambda a, b, **kw: bmm.append(b.shape[-1]) or real_bmm(a, b, **kw)
    )
    torch.manual_seed(0)
    for lstm, steps, expected in [
        (nn.LSTM(16, 16), 2, "ghost"),  # T (d_in + d_out) = 2 · 80 < 16 · 64
        (nn.LSTM(2, 2), 30, "materialised"),  # 30 · 10 > 2 · 8
    ]:
        lstm = lstm.double()
        x = torch.randn(steps, 3, lstm.input_size, dtype=torch.float64)
        calls.clear()
        bmm.clear()
        with indigrad.capture(lstm) as cap:
            out, _ = lstm(x)
            norms = cap.norms(out.sin().sum((0, 2)))
        ref = indigrad.testing.loop_grads(
            lstm, lambda x, m=lstm: m(x.transpose(0, 1))[0].sin().sum((0, 2)), x.transpose(0, 1)
        )
        torch.testing.assert_close(norms, indigrad.testing.norms_of(ref))
        assert calls == [expected, expected]  # weight_ih, weight_hh
        grams = [steps] * 4 if expected == "ghost" else [lstm.input_size, lstm.hidden_size]
        assert bmm == grams


class Classifier(nn.Module):
    """Tokens -> embedding -> 2-layer bidirectional recurrent layer -> Linear."""

    def __init__(self, cls: type[nn.RNNBase], vocab: int = 11, k: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 5)
        self.init = nn.Linear(2, 6)  # the initial state, from per-example features
        self.rnn = cls(5, 6, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(2 * 6, k)

    def forward(self, tokens: Tensor, features: Tensor) -> Tensor:
        h0 = torch.tanh(self.init(features)).expand(4, -1, -1).contiguous()  # (L·D, n, H)
        hx: Any = (h0, torch.zeros_like(h0)) if isinstance(self.rnn, nn.LSTM) else h0
        out, _ = self.rnn(self.embed(tokens), hx)  # (n, T, 2H)
        return self.head(out.mean(1))  # (n, k)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN], ids=lambda c: c.__name__)
def test_classifier(cls):
    torch.manual_seed(0)
    model = Classifier(cls).double()
    tokens = torch.randint(0, 11, (5, 7))
    features = torch.randn(5, 2, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))

    def losses(tokens, features, y):
        return F.cross_entropy(model(tokens, features), y, reduction="none")

    indigrad.testing.check(model, losses, tokens, features, y)


class Around(nn.Module):
    """A module without a rule around a recurrent layer, using its own parameter through
    ``exp`` (the generic rule re-runs it, recurrent layer and all): sequence first, or on a
    PackedSequence of the lengths given, under which torch.func cannot run the layer."""

    def __init__(self, cls: type[nn.RNNBase], packed: bool) -> None:
        super().__init__()
        self.rnn = cls(3, 4, batch_first=packed)
        self.gain = nn.Parameter(torch.linspace(-0.5, 0.5, 4))
        self.head = nn.Linear(4, 3)
        self.packed = packed

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        if self.packed:  # x (n, T, 3)
            x = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            _, h = self.rnn(x)
            h = h[0] if isinstance(h, tuple) else h  # (1, n, 4): the last valid step's
            return self.head(torch.tanh(h[-1] * self.gain.exp()))  # (n, 3)
        out, _ = self.rnn(x)  # (T, n, 4)
        return self.head(torch.tanh(out * self.gain.exp())).mean(0, keepdim=True)  # (1, n, 3)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU], ids=lambda c: c.__name__)
@pytest.mark.parametrize("packed", [False, True], ids=["sequence_first", "packed"])
def test_generic_rule_reruns_recurrent_layers_one_example_at_a_time(cls, packed):
    # vmap cannot batch the layers' fused kernels, nor torch.func run them on a
    # PackedSequence: the generic rule takes the examples one after another, by autograd
    torch.manual_seed(0)
    model = Around(cls, packed).double()
    n, T = 5, 6
    lengths, y = torch.tensor([6, 3, 5, 1, 4]), torch.randint(0, 3, (n,))

    def losses(x: Tensor, lengths: Tensor, y: Tensor) -> Tensor:
        logits = model(x, lengths)  # (n, 3), or (1, n, 3) sequence first
        return F.cross_entropy(logits if packed else logits[0], y.flatten(), reduction="none")

    if packed:
        x = torch.randn(n, T, 3, dtype=torch.float64)
        indigrad.testing.check(model, losses, x, lengths, y)
    else:  # every tensor with its examples along dimension 1
        x = torch.randn(T, n, 3, dtype=torch.float64)
        indigrad.testing.check(model, losses, x, lengths[None], y[None], batch_dim=1)


def test_frozen_parameters_are_skipped():
    model, batch = _variants(nn.LSTM, "lstm", 1, proj_size=2)[0].build()
    model.rnn.weight_hh_l0.requires_grad_(False)
    model.rnn.bias_ih_l1_reverse.requires_grad_(False)
    model.rnn.weight_hr_l0.requires_grad_(False)
    indigrad.testing.check(model, _losses(model), *batch)


def test_dropout_between_layers():
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, num_layers=2, dropout=0.5).double()
    x = torch.randn(5, 3, 3, dtype=torch.float64)

    def losses(x):
        return lstm(x.transpose(0, 1))[0].square().sum((0, 2))

    with indigrad.capture(lstm) as cap, pytest.raises(RuntimeError, match=r"dropout=0\.5"):
        cap.grads(losses(x))
    lstm.eval()  # no dropout: exact
    indigrad.testing.check(lstm, losses, x)


def test_unbatched_input_is_an_error():
    gru = nn.GRU(3, 4).double()
    with indigrad.capture(gru) as cap, pytest.raises(RuntimeError, match="unbatched"):
        out, _ = gru(torch.randn(5, 3, dtype=torch.float64))
        cap.grads(out.sum(1))


@pytest.mark.parametrize("materialise", [False, True], ids=["ghost", "materialised"])
def test_recurrence_is_recomputed_once_per_call(materialise, monkeypatch):
    """A clipped sum needs the norms and the weighted sum of every gate; the recurrence
    behind them is recomputed once per call, not once per quantity."""
    from indigrad.rules import _cost, recurrent

    monkeypatch.setattr(_cost, "materialise_to_clip", lambda *a, **k: materialise)
    torch.manual_seed(0)
    model = Classifier(nn.LSTM).double()
    tokens, features = torch.randint(0, 11, (5, 7)), torch.randn(5, 2, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    calls = []  # recurrences recomputed: by hand, or unrolled under autograd
    real, by_hand = recurrent._unroll, recurrent._by_hand
    monkeypatch.setattr(recurrent, "_unroll", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(recurrent, "_by_hand", lambda *a: calls.append(1) or by_hand(*a))
    with indigrad.capture(model) as cap:
        cap.clip_(F.cross_entropy(model(tokens, features), y, reduction="none"), max_norm=0.1)
    assert len(calls) == 1
    calls.clear()
    with indigrad.capture(model) as cap:
        per = cap.backward(F.cross_entropy(model(tokens, features), y, reduction="none"))
        per.norms(), per.grads()
    assert len(calls) == 1

    def losses(tokens, features, y):
        return F.cross_entropy(model(tokens, features), y, reduction="none")

    indigrad.testing.check(model, losses, tokens, features, y)
