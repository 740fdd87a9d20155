"""Normalisation rules (LayerNorm, RMSNorm, GroupNorm, InstanceNorm, BatchNorm in eval mode)
against the per-example loop, their fast paths against their own grads, and the errors
where the statistics mix the examples."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import indigrad
from indigrad.rules import normalization


class Net(nn.Module):
    """``x`` (n, *shape) → Linear on the last dim (or nothing) → × scale → norm → tanh →
    flatten → Linear head (n, k)."""

    def __init__(self, norm: nn.Module, shape: tuple[int, ...], pre: bool, scale: float) -> None:
        super().__init__()
        self.pre = nn.Linear(shape[-1], shape[-1]) if pre else nn.Identity()
        self.norm = norm
        self.scale = scale
        self.head = nn.Linear(math.prod(shape), 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.norm(self.pre(x) * self.scale)).flatten(1))


@dataclass(frozen=True)
class Case:
    name: str
    norm: Callable[[], nn.Module]
    shape: tuple[int, ...]  # one example's input shape
    n: int = 4
    pre: bool = True  # a Linear before the norm; False: the norm sees the model's input
    scale: float = 1.0  # scales the norm's input (makes a default eps matter)
    eval: bool = False
    freeze: str | None = None  # "weight" or "bias" of the norm

    def build(self, dtype: torch.dtype) -> tuple[nn.Module, Callable[..., Tensor], Tensor, Tensor]:
        torch.manual_seed(0)
        model = Net(self.norm(), self.shape, self.pre, self.scale).to(dtype)
        norm = model.norm
        with torch.no_grad():
            for p in norm.parameters():
                p.normal_()  # not the ones / zeros they start as
            if getattr(norm, "running_mean", None) is not None:  # non-trivial running stats
                norm.running_mean.uniform_(-1, 1)
                norm.running_var.uniform_(0.2, 3)
        if self.freeze is not None:
            getattr(norm, self.freeze).requires_grad_(False)
        model.train(not self.eval)
        g = torch.Generator().manual_seed(1)
        x = torch.randn((self.n, *self.shape), generator=g, dtype=dtype)
        y = torch.randint(0, 3, (self.n,), generator=g)

        def loss_fn(x: Tensor, y: Tensor) -> Tensor:
            return F.cross_entropy(model(x), y, reduction="none")  # (n,)

        return model, loss_fn, x, y


def _instance(cls: type[nn.Module], c: int, **kw: bool) -> Callable[[], nn.Module]:
    return lambda: cls(c, affine=True, **kw)


CASES = [
    # LayerNorm: any normalized_shape, with and without bias, tokens, on the input
    Case("ln_1d", lambda: nn.LayerNorm(7), (7,)),
    Case("ln_tokens", lambda: nn.LayerNorm(5), (4, 5)),
    Case("ln_no_bias", lambda: nn.LayerNorm(5, bias=False), (3, 5)),
    Case("ln_2d_shape", lambda: nn.LayerNorm([3, 4]), (2, 3, 4)),
    Case("ln_3d_shape_on_input", lambda: nn.LayerNorm([2, 3, 4]), (2, 3, 4), pre=False),
    Case("ln_large_eps", lambda: nn.LayerNorm(3, eps=0.5), (2, 3)),
    Case("ln_single_feature", lambda: nn.LayerNorm(1), (3, 1)),
    Case("ln_batch_of_one", lambda: nn.LayerNorm(6), (2, 6), n=1),
    Case("ln_frozen_weight", lambda: nn.LayerNorm(5), (3, 5), freeze="weight"),
    Case("ln_frozen_bias", lambda: nn.LayerNorm(5), (3, 5), freeze="bias"),
    # RMSNorm: eps None (torch's default) on small inputs, where it matters in float32
    Case("rms_default_eps_small_input", lambda: nn.RMSNorm(7), (7,), scale=1e-3),
    Case("rms_eps", lambda: nn.RMSNorm(5, eps=1e-3), (3, 5), scale=0.03),
    Case("rms_2d_shape", lambda: nn.RMSNorm([3, 4]), (2, 3, 4)),
    Case("rms_on_input", lambda: nn.RMSNorm([2, 3]), (2, 3), pre=False),
    Case("rms_batch_of_one", lambda: nn.RMSNorm(4), (3, 4), n=1),
    # GroupNorm: (n, C) to 3-D spatial, one group, a group per channel, no bias
    Case("gn_flat", lambda: nn.GroupNorm(2, 6), (6,)),
    Case("gn_1d", lambda: nn.GroupNorm(3, 6), (6, 5)),
    Case("gn_2d", lambda: nn.GroupNorm(2, 4), (4, 3, 5)),
    Case("gn_3d_one_group", lambda: nn.GroupNorm(1, 3), (3, 2, 3, 2)),
    Case("gn_group_per_channel", lambda: nn.GroupNorm(5, 5), (5, 3)),
    Case("gn_no_bias", lambda: nn.GroupNorm(2, 4, bias=False), (4, 7), pre=False),
    Case("gn_large_eps_batch_of_one", lambda: nn.GroupNorm(2, 4, eps=0.3), (4, 3), n=1),
    Case("gn_frozen_weight", lambda: nn.GroupNorm(3, 6), (6, 5), freeze="weight"),
    # InstanceNorm (affine): own statistics in training mode, running ones in eval mode
    # when tracked; each in both modes, tracked or not
    *[
        Case(
            f"in{d}d_{'tracked' if track else 'untracked'}_{'eval' if ev else 'train'}",
            _instance(cls, shape[0], track_running_stats=track),
            shape,
            eval=ev,
        )
        for d, cls, shape in [
            (1, nn.InstanceNorm1d, (4, 7)),
            (2, nn.InstanceNorm2d, (3, 4, 5)),
            (3, nn.InstanceNorm3d, (2, 3, 2, 3)),
        ]
        for track in (False, True)
        for ev in (False, True)
        if track or not ev or d == 1  # untracked: eval the same as training mode
    ],
    Case("in1d_no_bias", _instance(nn.InstanceNorm1d, 3, bias=False), (3, 5), pre=False),
    Case("in2d_batch_of_one", _instance(nn.InstanceNorm2d, 2), (2, 3, 3), n=1),
    # BatchNorm in eval mode: a per-channel affine map of the running statistics
    Case("bn1d_flat", lambda: nn.BatchNorm1d(7), (7,), eval=True),
    Case("bn1d_seq", lambda: nn.BatchNorm1d(4), (4, 5), eval=True),
    Case("bn2d", lambda: nn.BatchNorm2d(3), (3, 4, 5), eval=True),
    Case("bn3d", lambda: nn.BatchNorm3d(2), (2, 3, 2, 3), eval=True),
    Case("bn2d_no_bias_on_input", lambda: nn.BatchNorm2d(3, bias=False), (3, 2, 5), eval=True),
    Case("bn2d_large_eps", lambda: nn.BatchNorm2d(2, eps=0.5), (2, 3, 3), eval=True),
    Case("bn1d_batch_of_one", lambda: nn.BatchNorm1d(5), (5, 3), n=1, eval=True),
    Case("bn2d_frozen_bias", lambda: nn.BatchNorm2d(3), (3, 2, 2), eval=True, freeze="bias"),
    Case("syncbn_eval", lambda: nn.SyncBatchNorm(3), (3, 4, 2), eval=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_float64_matches_loop(case):
    model, loss_fn, x, y = case.build(torch.float64)
    indigrad.testing.check(model, loss_fn, x, y)


FLOAT32 = [  # one or two per class, with the options that change the numerics
    "ln_tokens",
    "ln_large_eps",
    "rms_default_eps_small_input",
    "rms_eps",
    "gn_2d",
    "gn_3d_one_group",
    "in1d_untracked_train",
    "in2d_tracked_eval",
    "bn2d",
    "bn3d",
]


@pytest.mark.parametrize("case", [c for c in CASES if c.name in FLOAT32], ids=lambda c: c.name)
def test_float32_matches_loop(case):
    model, loss_fn, x, y = case.build(torch.float32)
    # float32 tolerances of torch.testing.assert_close (rtol 1.3e-6, atol 1e-5)
    indigrad.testing.check(model, loss_fn, x, y)


@pytest.mark.parametrize("T", [5, 3], ids=["T5", "T=n"])
@pytest.mark.parametrize("norm", [nn.LayerNorm(6), nn.RMSNorm(6)], ids=["ln", "rms"])
def test_sequence_first(norm, T):
    # The forward's statistics are (T, n, 1): with T = n they looked like the batch-first
    # (n, T, 1) and were read transposed (ln.weight off by 158 %)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), norm, nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(T, 3, 4, dtype=torch.float64)  # (T, n, d)

    def losses(x: Tensor) -> Tensor:
        return model(x).sin().sum((0, 2))  # (n,)

    indigrad.testing.check(model, losses, x, batch_dim=1)


def test_empty_batch():
    model, loss_fn, _x, _y = CASES[0].build(torch.float64)
    x, y = torch.randn(0, 7, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    with indigrad.capture(model) as cap:
        grads = cap.grads(loss_fn(x, y))
    assert grads["norm.weight"].shape == (0, 7)


# -- the rules are the ones used, and their fast paths agree with their grads ---------------

RULES = {  # a module with all options that change the rule's math, and one input shape
    "layernorm_2d": (lambda: nn.LayerNorm([3, 4]), (2, 3, 4)),
    "layernorm_no_bias": (lambda: nn.LayerNorm(5, bias=False), (5,)),
    "rmsnorm": (lambda: nn.RMSNorm(4, eps=1e-2), (3, 4)),
    "groupnorm": (lambda: nn.GroupNorm(2, 4), (4, 3, 2)),
    "instancenorm1d": (lambda: nn.InstanceNorm1d(3, affine=True), (3, 5)),
    "instancenorm2d_tracked_train": (
        lambda: nn.InstanceNorm2d(3, affine=True, track_running_stats=True),
        (3, 2, 2),
    ),
    "instancenorm2d_tracked_eval": (
        lambda: nn.InstanceNorm2d(3, affine=True, track_running_stats=True).eval(),
        (3, 2, 2),
    ),
    "instancenorm3d_no_bias": (
        lambda: nn.InstanceNorm3d(2, affine=True, bias=False),
        (2, 2, 2, 3),
    ),
    "batchnorm1d": (lambda: nn.BatchNorm1d(4).eval(), (4,)),
    "batchnorm2d": (lambda: nn.BatchNorm2d(3).eval(), (3, 2, 5)),
    "batchnorm3d_no_bias": (lambda: nn.BatchNorm3d(2, bias=False).eval(), (2, 2, 3, 2)),
    "syncbatchnorm": (lambda: nn.SyncBatchNorm(3).eval(), (3, 4)),
}


@pytest.mark.parametrize(
    "cls",
    [
        nn.LayerNorm,
        nn.RMSNorm,
        nn.GroupNorm,
        nn.InstanceNorm1d,
        nn.InstanceNorm2d,
        nn.InstanceNorm3d,
        nn.LazyInstanceNorm2d,
        nn.BatchNorm1d,
        nn.BatchNorm2d,
        nn.BatchNorm3d,
        nn.LazyBatchNorm1d,
        nn.SyncBatchNorm,
    ],
)
def test_registered(cls):
    expected = {
        nn.LayerNorm: normalization.LAYER_NORM,
        nn.RMSNorm: normalization.RMS_NORM,
        nn.GroupNorm: normalization.GROUP_NORM,
        nn.SyncBatchNorm: normalization.SYNC_BATCH_NORM,
    }
    if cls in expected:
        rule = expected[cls]
    elif issubclass(cls, nn.modules.batchnorm._BatchNorm):
        rule = normalization.BATCH_NORM
    else:
        rule = normalization.INSTANCE_NORM
    module = cls(4) if cls is not nn.GroupNorm else cls(2, 4)
    assert indigrad.lookup_rule(module) is rule


@pytest.mark.parametrize("frozen", [None, "weight", "bias"])
@pytest.mark.parametrize("name", list(RULES))
def test_grads_cover_exactly_the_trainable_parameters(name, frozen):
    factory, shape = RULES[name]
    module = factory().double()
    rule = indigrad.lookup_rule(module)
    # no fast paths: the (n, P) gradients are materialised once, norms and sums taken from them
    assert rule is not None and rule.sq_norms is None and rule.weighted_sum is None
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(generator=g)
        if getattr(module, "running_mean", None) is not None:
            module.running_mean.uniform_(-1, 1, generator=g)
            module.running_var.uniform_(0.2, 3, generator=g)
    params = dict(module.named_parameters())
    if frozen is not None:
        if frozen not in params:
            pytest.skip(f"{type(module).__name__} has no {frozen}")
        params.pop(frozen).requires_grad_(False)
    if not params:
        pytest.skip("nothing left to train")
    x = torch.randn((4, *shape), generator=g, dtype=torch.float64)
    G = torch.randn((4, *shape), generator=g, dtype=torch.float64)
    grads = rule.grads(module, (x,), G)
    assert set(grads) == set(params)  # frozen ones skipped
    for k, p in params.items():
        assert grads[k].shape == (4, *p.shape)
    # the sum over examples is the plain parameter gradient
    x.requires_grad_(False)
    (module(x) * G).sum().backward()
    for k, p in params.items():
        torch.testing.assert_close(grads[k].sum(0), p.grad)
    # the grads themselves, against autograd through the module one example at a time
    for j in range(4):
        out = module(x[j : j + 1])
        expected = torch.autograd.grad(out, list(params.values()), G[j : j + 1])
        for k, e in zip(params, expected, strict=True):
            torch.testing.assert_close(grads[k][j], e)


@pytest.mark.parametrize(
    "module,shape",
    [(nn.LayerNorm(6), (3, 6)), (nn.GroupNorm(2, 4), (4, 5))],
    ids=["layernorm", "groupnorm"],
)
def test_normalised_in_the_output_gradients_dtype(module, shape):
    # CUDA autocast runs these layers in float32 on a bfloat16 input: x̂ must be float32 too.
    rule = indigrad.lookup_rule(module)
    assert rule is not None
    g = torch.Generator().manual_seed(0)
    x = torch.randn((4, *shape), generator=g).bfloat16()
    G = torch.randn((4, *shape), generator=g)  # float32, as the float32 output's gradient
    grads = rule.grads(module, (x,), G)
    for j in range(4):
        out = module(x[j : j + 1].float())  # what autocast computes
        expected = torch.autograd.grad(out, [module.weight, module.bias], G[j : j + 1])
        torch.testing.assert_close(grads["weight"][j], expected[0])
        torch.testing.assert_close(grads["bias"][j], expected[1])


# -- errors: statistics that mix the examples ------------------------------------------------


def _losses(model: nn.Module, x: Tensor) -> Tensor:
    return model(x).square().flatten(1).sum(1)  # (n,)


@pytest.mark.parametrize(
    "norm,shape",
    [
        (nn.BatchNorm1d(4, track_running_stats=False), (4,)),
        (nn.BatchNorm2d(4, track_running_stats=False), (4, 3, 3)),
        (nn.BatchNorm3d(4, track_running_stats=False, bias=False), (4, 2, 2, 2)),
        (nn.SyncBatchNorm(4, track_running_stats=False), (4, 3)),
    ],
    ids=["bn1d", "bn2d", "bn3d_no_bias", "syncbn"],
)
@pytest.mark.parametrize("what", ["grads", "norms", "clip_"])
def test_batchnorm_eval_without_running_stats_is_refused(norm, shape, what):
    # In eval mode without running statistics BatchNorm normalises by batch statistics.
    model = nn.Sequential(norm).double().eval()
    x = torch.randn(6, *shape, dtype=torch.float64)
    with (
        indigrad.capture(model) as cap,
        pytest.raises(RuntimeError, match=r"mix(es)? the examples"),
    ):
        if what == "clip_":
            cap.clip_(_losses(model, x), max_norm=1.0)
        else:
            getattr(cap, what)(_losses(model, x))
    assert all(p.grad is None for p in model.parameters())  # clip_ wrote nothing


def test_batchnorm_rule_refuses_training_mode():
    module = nn.BatchNorm1d(3).double().train()  # the capture refuses this in the forward
    x, G = torch.randn(4, 3).double(), torch.randn(4, 3).double()
    with pytest.raises(RuntimeError, match=r"training mode.*mix the examples"):
        normalization.BATCH_NORM.grads(module, (x,), G)


@pytest.mark.parametrize(
    "norm", [nn.LayerNorm([6, 4]), nn.RMSNorm([6, 4])], ids=["layernorm", "rmsnorm"]
)
def test_normalising_over_the_batch_dimension_is_refused(norm):
    model = nn.Sequential(nn.Linear(4, 4), norm).double()
    x = torch.randn(6, 4, dtype=torch.float64)  # the norm's statistics span all 6 examples
    with indigrad.capture(model) as cap, pytest.raises(RuntimeError, match="batch dimension"):
        cap.norms(_losses(model, x))


def test_channels_not_after_the_batch_dimension_are_refused():
    module = nn.GroupNorm(2, 4).double()
    x = torch.randn(3, 5, 4, dtype=torch.float64)  # channels last: not what GroupNorm saw
    with pytest.raises(RuntimeError, match="channels must come right after"):
        normalization.GROUP_NORM.grads(module, (x,), torch.randn_like(x))


def test_group_norm_on_channels_last_inputs_matches_the_loop():
    # the input reaches the rule in the layout the module saw (channels last): its sums
    # over positions must not depend on it
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(64, 3))
    model = model.double().to(memory_format=torch.channels_last)
    x = torch.randn(5, 3, 6, 6, dtype=torch.float64).to(memory_format=torch.channels_last)
    y = torch.randint(0, 3, (5,))
    assert model[0](x).is_contiguous(memory_format=torch.channels_last)
    indigrad.testing.check(model, lambda x, y: F.cross_entropy(model(x), y, reduction="none"), x, y)


GN_CASES = [c for c in CASES if c.name.startswith("gn_")]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", GN_CASES, ids=lambda c: c.name)
def test_group_norm_backward_kernel_path_matches_the_loop(case, dtype, monkeypatch):
    # on a GPU a GroupNorm's dγ and dβ come from GroupNorm's backward kernel run on the
    # batch as one example; forced here on CPU, where it is otherwise not taken
    monkeypatch.setattr(normalization, "_GN_KERNEL_DEVICES", {"cpu"})
    taken, recomputed = [], []
    backward, forward = normalization._GN_SUMS, normalization._GN_STATISTICS
    monkeypatch.setattr(normalization, "_GN_SUMS", lambda *a: [taken.append(1), backward(*a)][1])
    monkeypatch.setattr(
        normalization, "_GN_STATISTICS", lambda *a: [recomputed.append(1), forward(*a)][1]
    )
    model, loss_fn, x, y = case.build(dtype)
    indigrad.testing.check(model, loss_fn, x, y)
    assert taken
    assert not recomputed  # the statistics the forward saved, taken from the graph


@pytest.mark.parametrize("frozen", [None, "weight", "bias"])
def test_group_norm_backward_kernel_path_gives_the_sums(frozen, monkeypatch):
    module = nn.GroupNorm(3, 6).double()
    with torch.no_grad():
        module.weight.normal_()
    if frozen:
        getattr(module, frozen).requires_grad_(False)
    x = torch.randn(4, 6, 3, 5, dtype=torch.float64)
    G = torch.randn_like(x)
    sums = normalization.GROUP_NORM.grads(module, (x,), G)
    monkeypatch.setattr(normalization, "_GN_KERNEL_DEVICES", {"cpu"})
    kernel = normalization.GROUP_NORM.grads(module, (x,), G)
    assert kernel.keys() == sums.keys() == {"weight", "bias"} - {frozen}
    for k in sums:
        assert kernel[k].shape == (4, 6)
        torch.testing.assert_close(kernel[k], sums[k])


def test_group_norm_backward_kernel_path_over_batches_of_varying_size(monkeypatch):
    """The kernel's γ of ones is kept for the largest batch seen: a smaller one takes its
    first rows, and all give the loop's results (Poisson sampling varies n every step)."""
    monkeypatch.setattr(normalization, "_GN_KERNEL_DEVICES", {"cpu"})
    monkeypatch.setattr(normalization, "_ONES", {})
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 6, 3), nn.GroupNorm(3, 6), nn.Flatten(), nn.Linear(24, 2))
    model = model.double()
    for n in (5, 3, 7, 1):
        x = torch.randn(n, 2, 4, 4, dtype=torch.float64)
        indigrad.testing.check(model, lambda x: model(x).square().sum(1), x)
    (ones,) = normalization._ONES.values()
    assert ones.shape == (7, 6)
    assert normalization._ones(2, 6, torch.float64, torch.device("cpu"))._base is ones


def test_group_norm_statistics_from_the_graph_are_the_forwards():
    module = nn.GroupNorm(3, 6).double()
    x = torch.randn(4, 6, 3, 5, dtype=torch.float64, requires_grad=True)
    saved = normalization.GROUP_NORM.saved(module(x).grad_fn)
    _, mean, rstd = torch.ops.aten.native_group_norm(x.detach(), None, None, 4, 6, 15, 3, 1e-5)
    torch.testing.assert_close(saved, (mean, rstd), rtol=0, atol=0)
    assert normalization.GROUP_NORM.saved(x.exp().grad_fn) is None  # another op's node


LN_CASES = [c for c in CASES if c.name.startswith("ln_")]


@pytest.mark.parametrize("saved", [True, False], ids=["saved", "recomputed"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", LN_CASES, ids=lambda c: c.name)
def test_layer_norm_xhat_from_the_forwards_statistics(case, dtype, saved, monkeypatch):
    # on CPU LayerNorm's x̂ comes from the mean and 1/std its forward saved; elsewhere
    # (forced here by an empty set of devices) from layer_norm again: both match the loop
    if not saved:
        monkeypatch.setattr(normalization, "_LN_SAVED_DEVICES", set())
    recomputed = []
    again = normalization._layer_norm
    monkeypatch.setattr(
        normalization, "_layer_norm", lambda *a: [recomputed.append(1), again(*a)][1]
    )
    model, loss_fn, x, y = case.build(dtype)
    indigrad.testing.check(model, loss_fn, x, y)
    weight = case.freeze != "weight"
    assert bool(recomputed) == (weight and not saved)  # x̂ is needed for dγ only


def test_layer_norm_statistics_from_the_graph_are_the_forwards():
    module = nn.LayerNorm([3, 4]).double()
    x = torch.randn(5, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    mean, rstd = normalization.LAYER_NORM.saved(module(x).grad_fn)
    xd = x.detach()
    assert mean.shape == rstd.shape == (5, 2, 1, 1)
    torch.testing.assert_close(mean, xd.mean((2, 3), keepdim=True))
    var = xd.var((2, 3), unbiased=False, keepdim=True)
    torch.testing.assert_close(rstd, (var + module.eps).rsqrt())
    xhat = normalization._layer_norm_from(module, xd, (mean, rstd))
    torch.testing.assert_close(xhat, normalization._layer_norm(module, xd), rtol=0, atol=1e-15)
    assert normalization.LAYER_NORM.saved(x.exp().grad_fn) is None  # another op's node


def test_layer_norm_statistics_that_do_not_fit_are_not_used():
    module = nn.LayerNorm(4)
    x = torch.randn(3, 5, 4)
    mean, rstd = torch.zeros(3, 5, 1), torch.ones(3, 5, 1)  # x̂ = x if they were used
    again = normalization._layer_norm(module, x)
    for saved in [
        (mean[:, :1], rstd[:, :1]),  # the shape of other rows
        (mean.double(), rstd.double()),  # another dtype
        None,
    ]:
        torch.testing.assert_close(normalization._layer_norm_from(module, x, saved), again)
    xb = x.bfloat16()  # rounded statistics: the kernel computes in float32
    bf16 = normalization._layer_norm_from(module, xb, (mean.bfloat16(), rstd.bfloat16()))
    torch.testing.assert_close(bf16, normalization._layer_norm(module, xb), rtol=0, atol=0)
    torch.testing.assert_close(normalization._layer_norm_from(module, x, (mean, rstd)), x)
