"""The run-time check that the rows indigrad takes for examples are the examples'
(``indigrad/_verify.py``): the models below have a dimension with as many entries as the
batch by chance, and each gives wrong numbers unchecked (``verify="never"``)."""

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import indigrad
from indigrad.testing import loop_grads


class SequenceFirstView(nn.Module):
    """A batch-first model that runs a layer on a sequence-first view: at ``T = n`` that
    layer's positions look like examples. With ``in_place``, an in-place op after the
    layer rebuilds its output's history (its gradient is read at the view's base)."""

    def __init__(self, in_place: bool = False) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.in_place = in_place

    def forward(self, x: Tensor) -> Tensor:  # (n, T, 4)
        h = self.a(x).transpose(0, 1).contiguous()  # (T, n, 4)
        h = self.b(h)  # a view of the product's (T·n, 4) output
        h = h.relu_() if self.in_place else torch.tanh(h)
        return self.out(h.transpose(0, 1).mean(1))


class MaskedMix(nn.Module):
    """No rule of its own; reads a ``(T, T)`` mask, which at ``T = n`` looks batched."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:  # (n, T, 4), (T, T)
        scores = (x @ self.w @ x.transpose(1, 2)).masked_fill(mask, -1e9)  # (n, T, T)
        return scores.softmax(-1) @ x


class CausalMix(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.mix, self.out = nn.Linear(4, 4), MaskedMix(), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:  # (n, T, 4)
        T = x.shape[1]
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)  # (T, T)
        return self.out(self.mix(self.inp(x), mask).mean(1))


class MergedLatents(nn.Module):
    """Trainable latents, normalised, then merged with their features before they meet
    the batch: at ``L = n`` the norm's rows look like examples."""

    def __init__(self, L: int) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(L, 4))
        self.norm, self.inp, self.out = nn.LayerNorm(4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:  # (n, L, 4)
        z = self.norm(self.latents).reshape(-1)  # (L * 4,)
        return self.out((self.inp(x) + z.view(1, -1, 4)).mean(1))


class Experts(nn.Module):
    """Top-1 routing of the tokens to two experts: an expert given ``n`` tokens looks
    batched."""

    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(4, 2)
        self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
        self.out = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:  # (n, T, 4)
        n, T, d = x.shape
        gate = self.router(x).softmax(-1).reshape(n * T, 2)
        tokens = x.reshape(n * T, d)
        choice = gate.argmax(-1)  # (n * T,)
        y = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            idx = (choice == e).nonzero().squeeze(1)  # (count,)
            y = y.index_add(0, idx, expert(tokens[idx]) * gate[idx, e : e + 1])
        return self.out(y.view(n, T, d).mean(1))


class Centred(nn.Module):
    """No rule of its own; subtracts ``share`` of the batch's mean (batch statistics)."""

    def __init__(self, d_in: int, d_out: int, share: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(d_in, d_out) / 3)
        self.share = share

    def forward(self, x: Tensor) -> Tensor:
        h = x @ self.w
        return h - self.share * h.mean(0, keepdim=True)


def _experts_with_n_tokens(n: int) -> tuple[nn.Module, Tensor]:
    """The experts and a batch that routes exactly ``n`` tokens to expert 0, not one of
    each example in order (those would be the examples' rows)."""
    torch.manual_seed(0)
    model = Experts().double()
    for seed in range(1000):
        x = torch.randn(n, 2, 4, generator=torch.Generator().manual_seed(seed)).double()
        with torch.no_grad():
            idx = (model.router(x).argmax(-1).flatten() == 0).nonzero().squeeze(1)
            if len(idx) == n and not torch.equal(idx // 2, torch.arange(n)):
                return model, x
    raise AssertionError("no batch routes n tokens to expert 0")


def _model(name: str, n: int) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    if name == "experts":
        return _experts_with_n_tokens(n)
    model = {
        "sequence-first view": SequenceFirstView,
        "sequence-first view, relu_": lambda: SequenceFirstView(in_place=True),
        "(T, T) mask": CausalMix,
        "merged latents": lambda: MergedLatents(n),
    }[name]()
    return model.double(), torch.randn(n, n, 4, dtype=torch.float64)


def _losses(model: nn.Module) -> Callable[[Tensor], Tensor]:
    return lambda x: model(x).square().sum(1)


CASES = {
    "sequence-first view": "Linear 'b': the rows of its output",
    "sequence-first view, relu_": "Linear 'b': the rows of its output",
    "(T, T) mask": "MaskedMix 'mix' has no rule of its own, and re-running it",
    "merged latents": "LayerNorm 'norm': the rows of its output",
    "experts": "Linear 'experts.0': the rows of its output",
}


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("name", CASES)
def test_rows_that_are_not_examples_are_refused(name, n):
    model, x = _model(name, n)
    with indigrad.capture(model, verify="never") as cap:  # unchecked: wrong numbers
        grads = cap.grads(_losses(model)(x))
    ref = loop_grads(model, _losses(model), x)
    assert any(not torch.allclose(grads[k], ref[k], atol=1e-6) for k in ref)
    for verify in ("new", "always"):
        with (
            indigrad.capture(model, verify=verify) as cap,
            pytest.raises(RuntimeError, match=CASES[name]),
        ):
            cap.clip_(_losses(model)(x), max_norm=1.0)
    assert all(p.grad is None for p in model.parameters())  # nothing was added


def test_a_loss_that_reads_other_examples_is_refused():
    # losses[i] depends on every example's features (a batch mean): the rows of the
    # layer's output are not example i's alone, so Goodfellow's trick does not give
    # ∇θ losses[i]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(6, 5, dtype=torch.float64)

    def losses(x: Tensor) -> Tensor:
        z = model(x)
        return (z - z.mean(0)).square().sum(1)

    with indigrad.capture(model) as cap, pytest.raises(RuntimeError, match="mixes examples"):
        cap.norms(losses(x))


def test_a_module_without_a_rule_that_mixes_examples_is_refused():
    torch.manual_seed(0)
    model = nn.Sequential(Centred(5, 4, share=1.0), nn.Tanh()).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    with indigrad.capture(model) as cap, pytest.raises(RuntimeError, match=r"x\.mean\(0\)"):
        cap.grads(model(x).square().sum(1))


def _backwards(model: nn.Module, x: Tensor, verify: str = "new") -> int:
    """How many backwards a clipped step of ``model`` on ``x`` runs."""
    ran = []
    with indigrad.capture(model, verify=verify) as cap:
        losses = model(x).square().sum(1)
        losses.grad_fn.register_prehook(lambda g: ran.append(1))
        cap.clip_(losses, max_norm=1.0)
    return len(ran)


@pytest.mark.parametrize("rows", [(0, 1), (3, 17), (5, 38)])
def test_two_examples_exchanged_in_a_large_batch_are_refused(rows):
    # every example has its own weight (up to 64 of them), so no pair of exchanged rows
    # can pass for an example's
    a, b = rows

    class Exchange(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1, self.l2 = nn.Linear(8, 16), nn.Linear(16, 3)

        def forward(self, x: Tensor) -> Tensor:
            h = torch.tanh(self.l1(x))
            h = torch.cat([h[:a], h[b : b + 1], h[a + 1 : b], h[a : a + 1], h[b + 1 :]])
            return self.l2(h)

    torch.manual_seed(0)
    model = Exchange()
    x = torch.randn(40, 8)
    for _ in range(5):  # five draws of the weights
        with (
            indigrad.capture(model, verify="always") as cap,
            pytest.raises(RuntimeError, match="Linear 'l1': the rows of its output"),
        ):
            cap.norms(model(x).square().sum(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weak_mixing_is_refused(dtype):
    # a batch-level term of weight 1e-4 in each loss (a load-balancing loss, say), and a
    # module without a rule that subtracts 1e-3 of the batch mean: per-example errors of
    # 1e-4 and below, which a DP guarantee does not allow
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)
    x, y = torch.randn(12, 8, dtype=dtype), torch.randint(0, 3, (12,))
    with indigrad.capture(model) as cap, pytest.raises(RuntimeError, match="Linear '0'"):
        out = model(x)
        aux = out.softmax(-1).mean(0).square().sum()  # all examples'
        cap.norms(F.cross_entropy(out, y, reduction="none") + 1e-4 * aux)

    model = nn.Sequential(Centred(8, 8, share=1e-3), nn.Tanh(), nn.Linear(8, 3)).to(dtype)
    with indigrad.capture(model) as cap, pytest.raises(RuntimeError, match="Centred '0'"):
        cap.norms(F.cross_entropy(model(x), y, reduction="none"))


def test_a_mixing_loss_in_float16_is_refused():
    # float16 losses: the weights must leave the weighted backward room (2^31 would
    # overflow it, and the rows could not be compared)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    x = torch.randn(6, 4)
    for _ in range(3):
        with indigrad.capture(model, verify="always") as cap:
            y = model(x).squeeze(-1)
            losses = (y - y.mean()).half().square() * 100  # (n,) float16, reads every example
            with pytest.raises(RuntimeError, match=r"Linear '.': the rows of its output"):
                cap.grads(losses)


def test_a_parameter_whose_size_meets_the_batch_size_is_checked_again():
    class Prototypes(nn.Module):  # no rule: reads its table inside
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Parameter(torch.randn(5, 4))

        def forward(self, x: Tensor) -> Tensor:
            return (x @ self.table.T).logsumexp(-1, keepdim=True)  # (n, 1)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), Prototypes())
    assert _backwards(model, torch.randn(3, 4)) == 2
    assert _backwards(model, torch.randn(6, 4)) == 1
    assert _backwards(model, torch.randn(5, 4)) == 2  # n = the table's rows


@pytest.mark.parametrize("scale", [1e-36, 1e-40, 1e30])
def test_no_false_alarm_at_extreme_loss_scales(scale):
    # at 1e-40 the plain backward's float32 gradients are subnormal, and round there
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(6, 8), torch.randint(0, 3, (6,))
    for _ in range(3):
        with indigrad.capture(model, verify="always") as cap:
            cap.norms(F.cross_entropy(model(x), y, reduction="none") * scale)


@pytest.mark.parametrize("half", [False, True])
def test_the_weights_are_distinct_powers_of_two_of_at_least_one(half):
    from indigrad import _verify

    m = 8 if half else 64
    w = _verify.weights(m, torch.device("cpu"), half)
    assert len(set(w.tolist())) == m  # each example its own
    exponent = w.abs().log2()
    assert torch.equal(exponent, exponent.round()) and bool((exponent >= 0).all())


def test_checked_where_the_pattern_of_sizes_is_new():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    seq = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()

    def batch(*shape: int) -> Tensor:
        return torch.randn(*shape, 4, dtype=torch.float64)

    assert _backwards(model, batch(8)) == 2  # the first step is checked
    assert _backwards(model, batch(8)) == 1
    assert _backwards(model, batch(5)) == 1  # another batch size, the same pattern
    assert _backwards(model, batch(1)) == 1  # one example: nothing to tell apart
    assert _backwards(model, batch(6), verify="always") == 2
    assert _backwards(model, batch(6), verify="never") == 1
    assert _backwards(seq, batch(5, 7)) == 2  # another model
    assert _backwards(seq, batch(9, 7)) == 1
    assert _backwards(seq, batch(7, 7)) == 2  # T = n: sizes meet the batch size
    assert _backwards(seq, batch(7, 7)) == 1
    assert _backwards(seq, batch(3, 7)) == 1


def test_a_failed_check_is_run_again():
    model, x = _model("sequence-first view", 3)
    for _ in range(2):
        with indigrad.capture(model) as cap, pytest.raises(RuntimeError, match="Linear 'b'"):
            cap.norms(_losses(model)(x))


def test_a_rerun_check_counts_once_the_rule_ran():
    # a call without a rule is checked where its gradients are taken: a step that never
    # takes them leaves the pattern unchecked
    model, x = _model("(T, T) mask", 4)
    x = torch.randn(4, 3, 4, dtype=torch.float64)  # T != n: right
    with indigrad.capture(model) as cap:
        cap.backward(_losses(model)(x))  # nothing taken
    assert _backwards(model, x) == 2
    assert _backwards(model, x) == 1


def test_the_program_s_random_numbers_are_left_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    x = torch.randn(8, 4)
    state = torch.get_rng_state()
    assert _backwards(model, x, verify="always") == 2
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_false_alarm_in_low_precision(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Embedding(50, 16),
        nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True),
        nn.LayerNorm(16),
        nn.Linear(16, 50),
    ).to(dtype)
    ids = torch.randint(0, 50, (12, 12))  # T = n as well
    with indigrad.capture(model, verify="always") as cap:
        logits = model(ids).float()
        cap.clip_(F.cross_entropy(logits.transpose(1, 2), ids, reduction="none"), 1.0)


def test_verify_takes_one_of_its_modes():
    with pytest.raises(ValueError, match="verify must be one of"):
        indigrad.capture(nn.Linear(2, 2), verify="sometimes")


def test_a_gradient_of_rounding_noise_is_no_false_alarm():
    # a LayerNorm over one feature outputs its bias whatever its input: the gradient at the
    # layer before it is rounding noise. An example's noise scales exactly with a weight
    # that is a power of two, so the two backwards agree there too.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 1), nn.LayerNorm(1), nn.Linear(1, 3)).double()
    with torch.no_grad():
        model[1].weight.fill_(1.7)
    x = torch.randn(8, 4, dtype=torch.float64)
    for _ in range(3):
        assert _backwards(model, x, verify="always") == 2


def test_a_module_without_a_rule_off_the_losses_path_does_not_hold_the_check_open():
    class Side(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3))

        def forward(self, x: Tensor) -> Tensor:
            return x @ self.w

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.side, self.out = Side(), nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            self.kept = self.side(x)  # computed, never used by the losses
            return self.out(x)

    torch.manual_seed(0)
    model = Model().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    assert _backwards(model, x) == 2
    assert _backwards(model, x) == 1
