"""Conv{1,2,3}d and ConvTranspose{1,2,3}d rules against the per-example loop."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import indigrad
from indigrad.rules import conv

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# The table: one conv layer (every option), then tanh → flatten → Linear → cross-entropy.


@dataclass(frozen=True)
class Conf:
    name: str
    layer: Callable[[], nn.Module]
    x_shape: tuple[int, ...]


CONFS = [
    # Conv1d
    Conf("c1_basic", lambda: nn.Conv1d(3, 4, 3), (4, 3, 9)),
    Conf("c1_stride_pad", lambda: nn.Conv1d(3, 5, 4, stride=2, padding=2), (3, 3, 11)),
    Conf("c1_same_even_k", lambda: nn.Conv1d(2, 3, 4, padding="same"), (3, 2, 7)),
    Conf("c1_same_dilated", lambda: nn.Conv1d(2, 3, 3, padding="same", dilation=2), (3, 2, 8)),
    Conf("c1_valid", lambda: nn.Conv1d(2, 3, 3, padding="valid", dilation=2), (3, 2, 8)),
    Conf("c1_reflect", lambda: nn.Conv1d(2, 3, 3, padding=2, padding_mode="reflect"), (3, 2, 7)),
    Conf("c1_replicate", lambda: nn.Conv1d(2, 3, 3, 2, 3, padding_mode="replicate"), (3, 2, 7)),
    Conf("c1_circular", lambda: nn.Conv1d(2, 3, 3, padding=1, padding_mode="circular"), (3, 2, 7)),
    Conf(
        "c1_same_reflect_even_k",
        lambda: nn.Conv1d(2, 3, 4, padding="same", padding_mode="reflect"),
        (3, 2, 9),
    ),
    Conf("c1_depthwise_x2", lambda: nn.Conv1d(4, 8, 3, groups=4), (3, 4, 6)),
    Conf("c1_no_bias", lambda: nn.Conv1d(3, 4, 2, bias=False), (3, 3, 5)),
    Conf("c1_batch1", lambda: nn.Conv1d(3, 4, 3, padding=1), (1, 3, 5)),
    # Conv2d
    Conf("c2_basic", lambda: nn.Conv2d(3, 4, 3), (3, 3, 7, 6)),
    Conf(
        "c2_tuples_groups",
        lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2),
        (3, 4, 9, 8),
    ),
    Conf("c2_depthwise", lambda: nn.Conv2d(3, 3, 3, padding=1, groups=3), (2, 3, 5, 4)),
    Conf(
        "c2_same_circular",
        lambda: nn.Conv2d(2, 4, (3, 4), padding="same", padding_mode="circular"),
        (3, 2, 5, 6),
    ),
    Conf(
        "c2_reflect_stride",
        lambda: nn.Conv2d(2, 3, 3, stride=2, padding=(1, 2), padding_mode="reflect"),
        (3, 2, 7, 6),
    ),
    Conf(
        "c2_replicate_groups_no_bias",
        lambda: nn.Conv2d(4, 2, 2, padding=1, groups=2, bias=False, padding_mode="replicate"),
        (3, 4, 5, 3),
    ),
    Conf("c2_1x1", lambda: nn.Conv2d(5, 3, 1), (3, 5, 3, 4)),
    Conf("c2_big_channels", lambda: nn.Conv2d(16, 16, 3, padding=1), (2, 16, 3, 3)),
    Conf("c2_batch1", lambda: nn.Conv2d(2, 3, 3, stride=2), (1, 2, 7, 5)),
    # Conv3d
    Conf("c3_basic", lambda: nn.Conv3d(2, 3, 2), (2, 2, 4, 3, 5)),
    Conf(
        "c3_circular_groups_stride",
        lambda: nn.Conv3d(2, 4, (2, 3, 2), (1, 2, 1), 1, groups=2, padding_mode="circular"),
        (2, 2, 3, 5, 4),
    ),
    Conf(
        "c3_same_replicate_dilated",
        lambda: nn.Conv3d(2, 3, 3, padding="same", dilation=(1, 2, 1), padding_mode="replicate"),
        (2, 2, 3, 5, 3),
    ),
    # ConvTranspose1d
    Conf("t1_basic", lambda: nn.ConvTranspose1d(3, 4, 3), (3, 3, 5)),
    Conf(
        "t1_stride_outpad",
        lambda: nn.ConvTranspose1d(3, 2, 4, stride=3, padding=2, output_padding=2),
        (3, 3, 5),
    ),
    Conf(  # output_padding ≥ stride (allowed below dilation), > padding: G_full crops
        "t1_dilated_outpad",
        lambda: nn.ConvTranspose1d(3, 2, 3, dilation=3, padding=1, output_padding=2),
        (3, 3, 5),
    ),
    Conf(
        "t1_depthwise_no_bias", lambda: nn.ConvTranspose1d(4, 4, 3, groups=4, bias=False), (2, 4, 5)
    ),
    Conf("t1_batch1", lambda: nn.ConvTranspose1d(2, 3, 3, stride=2), (1, 2, 4)),
    # ConvTranspose2d
    Conf(
        "t2_groups_outpad",
        lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2),
        (3, 4, 4, 5),
    ),
    Conf(
        "t2_depthwise",
        lambda: nn.ConvTranspose2d(3, 6, (2, 3), stride=(2, 1), groups=3),
        (2, 3, 3, 4),
    ),
    Conf(
        "t2_outpad_above_pad",
        lambda: nn.ConvTranspose2d(2, 3, 3, stride=3, padding=(0, 1), output_padding=(2, 2)),
        (3, 2, 3, 2),
    ),
    Conf("t2_big_channels", lambda: nn.ConvTranspose2d(16, 16, 2, stride=2), (2, 16, 2, 2)),
    # ConvTranspose3d
    Conf(
        "t3_stride_pad_dilation",
        lambda: nn.ConvTranspose3d(2, 3, 2, stride=2, padding=1, dilation=(1, 2, 1)),
        (2, 2, 3, 2, 3),
    ),
    Conf(
        "t3_groups_outpad",
        lambda: nn.ConvTranspose3d(
            4, 2, (1, 2, 3), stride=(1, 2, 2), output_padding=(0, 1, 1), groups=2
        ),
        (2, 4, 2, 3, 2),
    ),
]


def _build(conf: Conf, dtype: torch.dtype = torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    layer = conf.layer().to(dtype)
    x = torch.randn(conf.x_shape, dtype=dtype)
    with torch.no_grad():
        width = layer(x)[0].numel()
    model = nn.Sequential(layer, nn.Tanh(), nn.Flatten(), nn.Linear(width, 3)).to(dtype)
    y = torch.randint(0, 3, (x.shape[0],))

    def losses(x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(model(x), y, reduction="none")  # (n,)

    return model, losses, x, y


def _force(monkeypatch, path: str) -> None:
    """Take one path for the norms and, for a clipped sum, the matching one for the sum."""
    monkeypatch.setattr(conv, "_ghost", lambda P, a, b: path == "ghost")
    monkeypatch.setattr(conv, "_materialise_to_clip", lambda P, a, b, dev, held: path != "ghost")


@pytest.mark.parametrize("conf", CONFS, ids=lambda c: c.name)
def test_float64_matches_loop(conf):
    # sq_norms by cost here; both branches on every conf: test_fast_paths_agree_with_materialised
    model, losses, x, y = _build(conf)
    assert indigrad.lookup_rule(model[0]) is conv.CONV[type(model[0])]
    indigrad.testing.check(model, losses, x, y)


@pytest.mark.parametrize(
    "name", ["c1_same_reflect_even_k", "c2_tuples_groups", "c3_basic", "t2_groups_outpad"]
)
@pytest.mark.parametrize("path", ["ghost", "materialise"])
def test_float32_matches_loop(name, path, monkeypatch):
    _force(monkeypatch, path)
    model, losses, x, y = _build(next(c for c in CONFS if c.name == name), torch.float32)
    # float32 tolerances of torch.testing.assert_close (rtol 1.3e-6, atol 1e-5)
    indigrad.testing.check(model, losses, x, y)


# ---------------------------------------------------------------------------------------------
# The fast paths against the materialised gradients, on the rule functions directly.


@pytest.mark.parametrize("conf", CONFS, ids=lambda c: c.name)
def test_fast_paths_agree_with_materialised(conf, monkeypatch):
    torch.manual_seed(0)
    layer = conf.layer().double()
    x = torch.randn(conf.x_shape, dtype=torch.float64)
    G = torch.randn_like(layer(x).detach())  # (n, C_out, *out)
    grads = conv.conv_grads(layer, (x,), G)
    assert set(grads) == {k for k, _ in layer.named_parameters()}
    for path in ["ghost", "materialise"]:
        _force(monkeypatch, path)
        fast = conv.conv_sq_norms(layer, (x,), G)
        for k, g in grads.items():
            torch.testing.assert_close(fast[k], g.flatten(1).square().sum(1))
    coef = torch.rand(x.shape[0], dtype=torch.float64)
    ws = conv.conv_weighted_sum(layer, (x,), G, coef)
    for k, g in grads.items():
        torch.testing.assert_close(ws[k], torch.einsum("n,n...->...", coef, g))
    # the sum over examples of the per-example gradients is the plain weight gradient
    layer.zero_grad()
    (layer(x) * G).sum().backward()
    for k, p in layer.named_parameters():
        torch.testing.assert_close(grads[k].sum(0), p.grad)


@pytest.mark.parametrize("conf", CONFS, ids=lambda c: c.name)
def test_cost_widths_match_the_factors(conf):
    # the cost choice reads P, a, b from the shapes; the factors are what the rules build
    layer = conf.layer().double()
    x = torch.randn(conf.x_shape, dtype=torch.float64)
    G = torch.randn_like(layer(x).detach())  # (n, C_out, *out)
    L, R = conv._factors(layer, x, G)  # (n·g, a, P), (n·g, b, P)
    assert conv._widths(layer, x, G) == (L.shape[2], L.shape[1], R.shape[1])


@pytest.mark.parametrize("conf", CONFS, ids=lambda c: c.name)
def test_unfold_and_strided_copy_build_the_same_factors(conf, monkeypatch):
    # on CPU a 2-d conv with symmetric zero padding unfolds with F.unfold, except into the
    # pool's large buffers and where a kernel row is longer than an output row (copied
    # position by position); on CUDA, whose F.unfold loops over the images, it unfolds the
    # batch as one image where there is padding: all must give the strided copy's im2col,
    # bit for bit
    layer = conf.layer().double()
    x = torch.randn(conf.x_shape, dtype=torch.float64)
    G = torch.randn_like(layer(x).detach())  # (n, C_out, *out)
    unfolded = []
    real = F.unfold
    monkeypatch.setattr(
        conv.F, "unfold", lambda t, *a, **k: unfolded.append(tuple(t.shape)) or real(t, *a, **k)
    )
    L, R = conv._factors(layer, x, G)  # (n·g, a, P), (n·g, b, P)
    two_d = isinstance(layer, nn.Conv2d) and layer.padding_mode == "zeros"
    pads = conv._pad_list(layer)
    by_position = layer.kernel_size[-1] > G.shape[-1]
    symmetric = two_d and pads[0] == pads[1] and pads[2] == pads[3]
    assert bool(unfolded) == (symmetric and not by_position)
    unfolded.clear()
    with monkeypatch.context() as m:
        m.setattr(conv._alloc, "pooled", lambda shape, like: True)  # no F.unfold
        L2, R2 = conv._factors(layer, x, G)
    assert torch.equal(L, L2) and torch.equal(R, R2)
    monkeypatch.setattr(conv, "_BATCHED_UNFOLD", set())  # neither F.unfold: the copy
    monkeypatch.setattr(conv, "_BY_POSITION", set())  # and not by position
    L3, R3 = conv._factors(layer, x, G)
    assert torch.equal(L, L3) and torch.equal(R, R3)
    assert not unfolded
    monkeypatch.setattr(conv, "_ONE_IMAGE_UNFOLD", {"cpu"})  # as on CUDA
    L4, R4 = conv._factors(layer, x, G)
    assert torch.equal(L, L4) and torch.equal(R, R4)
    assert bool(unfolded) == (symmetric and any(pads)), unfolded
    if unfolded:  # the whole batch as one image, n·C_in channels
        assert unfolded[0] == (1, x.shape[0] * x.shape[1], *x.shape[2:])


@pytest.mark.parametrize(
    "layer, x_shape",
    [
        (lambda: nn.Conv2d(6, 6, 7, padding=3, groups=6), (3, 6, 2, 2)),  # ConvNeXt's, late
        (lambda: nn.Conv2d(4, 6, (3, 5), stride=(1, 2), padding=2, groups=2), (2, 4, 4, 5)),
        (lambda: nn.Conv1d(2, 4, 5, dilation=2, padding=3), (3, 2, 4)),
        (lambda: nn.ConvTranspose2d(4, 2, 5, stride=2, groups=2), (2, 4, 2, 1)),
    ],
    ids=["depthwise_7x7", "grouped_strided", "conv1d_dilated", "transposed_grouped"],
)
def test_im2col_by_position(layer, x_shape, monkeypatch):
    """Kernel rows longer than output rows: im2col copied position by position (CPU),
    the same factors as the strided copy, and every quantity as the loop's."""
    torch.manual_seed(0)
    layer = layer().double()
    x = torch.randn(x_shape, dtype=torch.float64)
    G = torch.randn_like(layer(x).detach())  # (n, C_out, *out)
    copied = []
    real = conv._alloc.empty
    monkeypatch.setattr(conv._alloc, "empty", lambda s, like: copied.append(s) or real(s, like))
    L, R = conv._factors(layer, x, G)  # (n·g, a, P), (n·g, b, P)
    g, k = layer.groups, layer.kernel_size
    assert copied and copied[0][-len(k) - 1 :] == ((R.shape[1] // math.prod(k)), *k)
    with monkeypatch.context() as m:
        m.setattr(conv, "_BY_POSITION", set())
        L2, R2 = conv._factors(layer, x, G)
    assert torch.equal(L, L2) and torch.equal(R, R2) and R.shape[0] == x.shape[0] * g
    model = nn.Sequential(layer, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3)).double()
    model(x)  # materialise the lazy head
    y = torch.tensor([0, 2, 1])[: x.shape[0]]
    indigrad.testing.check(model, lambda x, y: F.cross_entropy(model(x), y, reduction="none"), x, y)


def test_ghost_and_materialised_branches_are_both_taken(monkeypatch):
    monkeypatch.setattr(conv, "_DEPTHWISE_BY_CONV", set())  # the depthwise case's choice too
    taken = []
    real = conv._ghost
    monkeypatch.setattr(conv, "_ghost", lambda P, a, b: taken.append(real(P, a, b)) or taken[-1])
    cases = [
        (nn.Conv2d(16, 16, 3, padding=1), (2, 16, 3, 3)),  # P=9, a=16, b=144: ghost
        (nn.Conv2d(2, 3, 3), (2, 2, 10, 10)),  # P=64, a=3, b=18: materialise
        (nn.ConvTranspose2d(16, 16, 2, stride=2), (2, 16, 2, 2)),  # P=4, a=16, b=64: ghost
        (nn.Conv1d(4, 4, 3, groups=4), (2, 4, 9)),  # depthwise, a=1: materialise
    ]
    for layer, shape in cases:
        x = torch.randn(shape)
        conv.conv_sq_norms(layer, (x,), torch.randn_like(layer(x).detach()))
    assert taken == [True, False, True, False]


def test_weighted_sum_does_not_materialise(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("weighted_sum unfolded the input")

    monkeypatch.setattr(conv, "_factors", refuse)
    monkeypatch.setattr(conv._alloc, "empty", refuse)
    layer = nn.Conv2d(3, 4, 3, padding=1, groups=1).double()
    x = torch.randn(5, 3, 6, 6, dtype=torch.float64)
    G = torch.randn(5, 4, 6, 6, dtype=torch.float64)
    out = conv.conv_weighted_sum(layer, (x,), G, torch.rand(5, dtype=torch.float64))
    assert out["weight"].shape == layer.weight.shape and out["bias"].shape == (4,)


# ---------------------------------------------------------------------------------------------
# Models and calls.


class SmallCNN(nn.Module):
    """No normalisation: convs of every kind, pooling, a decoder-style transposed conv."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4, padding_mode="reflect")
        self.dw = nn.Conv2d(8, 8, 3, padding="same", groups=8, bias=False)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.head = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: Tensor) -> Tensor:  # (n, 3, 8, 8)
        h = F.relu(self.c1(x))  # (n, 8, 8, 8)
        h = torch.tanh(self.c2(h))  # (n, 8, 4, 4)
        h = h + F.relu(self.dw(h))  # (n, 8, 4, 4)
        h = F.max_pool2d(F.relu(self.up(h)), 2)  # (n, 4, 4, 4)
        return self.head(h.flatten(1))


class ConvTwice(nn.Module):
    """One conv applied twice, its output size fixed by output_size on a transposed conv."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv1d(3, 3, 3, padding=1, padding_mode="circular")
        self.t = nn.ConvTranspose1d(3, 2, 3, stride=2)
        self.head = nn.Linear(2 * 12, 3)

    def forward(self, x: Tensor) -> Tensor:  # (n, 3, 5)
        h = torch.tanh(self.c(torch.tanh(self.c(x))))  # (n, 3, 5)
        h = self.t(input=h, output_size=[12])  # (n, 2, 12): output_padding 1 from output_size
        return self.head(torch.tanh(h).flatten(1))


def _ce(model: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    return lambda x, y: F.cross_entropy(model(x), y, reduction="none")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_small_cnn(dtype):
    torch.manual_seed(0)
    model = SmallCNN().to(dtype)
    x, y = torch.randn(4, 3, 8, 8, dtype=dtype), torch.randint(0, 5, (4,))
    indigrad.testing.check(model, _ce(model), x, y)


def test_conv_applied_twice_and_output_size():
    torch.manual_seed(0)
    model = ConvTwice().double()
    x, y = torch.randn(4, 3, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    indigrad.testing.check(model, _ce(model), x, y)


def test_channels_last_and_token_losses():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 5, 1)).double()
    x = torch.randn(3, 3, 5, 4, dtype=torch.float64).to(memory_format=torch.channels_last)
    y = torch.randint(0, 5, (3, 5, 4))

    def losses(x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(model(x), y, reduction="none")  # (n, 5, 4): per pixel

    indigrad.testing.check(model, losses, x, y)


@pytest.mark.parametrize(
    "layer, x_shape",
    [
        (nn.ConvTranspose1d(2, 3, 1, stride=5, padding=2, output_padding=4), (4, 2, 1)),
        (nn.ConvTranspose1d(2, 3, 2, stride=4, padding=2, output_padding=3), (4, 2, 2)),
        (
            nn.ConvTranspose2d(2, 3, 1, stride=(5, 1), padding=(2, 0), output_padding=(4, 0)),
            (3, 2, 1, 3),
        ),
    ],
)
def test_transposed_padding_beyond_the_full_output(layer, x_shape):
    # padding crops more than the full output in a dimension: the output lies partly or
    # wholly in output_padding's margin
    torch.manual_seed(0)
    layer = layer.double()
    x = torch.randn(x_shape, dtype=torch.float64)
    indigrad.testing.check(layer, lambda x: layer(x).sin().flatten(1).sum(1), x, max_norm=0.5)


@pytest.mark.parametrize("frozen", ["weight", "bias"])
def test_frozen_parameter(frozen):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3, groups=1), nn.Tanh(), nn.Flatten(), nn.Linear(9, 2))
    model = model.double()
    getattr(model[0], frozen).requires_grad_(False)
    x, y = torch.randn(4, 2, 5, dtype=torch.float64), torch.randint(0, 2, (4,))
    indigrad.testing.check(model, _ce(model), x, y)
    with indigrad.capture(model) as cap:
        grads = cap.grads(_ce(model)(x, y))
    assert f"0.{frozen}" not in grads


@pytest.mark.parametrize("cls", [nn.Conv1d, nn.ConvTranspose1d])
def test_unbatched_input_is_an_error(cls):
    layer = cls(4, 4, 3).double()
    x = torch.randn(4, 6, dtype=torch.float64)  # (C, L): torch accepts it unbatched
    with indigrad.capture(layer) as cap:
        out = layer(x)  # (4, L_out)
        with pytest.raises(RuntimeError, match=r"batched input .*x\.unsqueeze\(0\)"):
            cap.norms(out.sum(1))


# ---------------------------------------------------------------------------------------------
# Shapes and options by hypothesis.


@settings(max_examples=25, deadline=None)
@given(
    dims=st.sampled_from([1, 2]),
    transposed=st.booleans(),
    n=st.integers(1, 3),
    groups=st.sampled_from([1, 2]),
    c_in=st.integers(1, 2),
    c_out=st.integers(1, 2),
    k=st.integers(1, 3),
    stride=st.integers(1, 3),
    dilation=st.integers(1, 2),
    padding=st.integers(0, 2),
    output_padding=st.integers(0, 2),
    size=st.integers(1, 6),
    mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
    bias=st.booleans(),
    ghost=st.booleans(),
)
def test_shapes(
    dims,
    transposed,
    n,
    groups,
    c_in,
    c_out,
    k,
    stride,
    dilation,
    padding,
    output_padding,
    size,
    mode,
    bias,
    ghost,
):
    C_in, C_out = c_in * groups, c_out * groups
    if transposed:
        assume(output_padding < max(stride, dilation) and mode == "zeros")
        assume((size - 1) * stride - 2 * padding + dilation * (k - 1) + output_padding >= 0)
        layer: nn.Module = nn.ConvTranspose2d if dims == 2 else nn.ConvTranspose1d
        layer = layer(C_in, C_out, k, stride, padding, output_padding, groups, bias, dilation)
    else:
        assume(mode == "zeros" or padding < size)
        assume(size + 2 * padding - dilation * (k - 1) >= 1)
        cls = nn.Conv2d if dims == 2 else nn.Conv1d
        layer = cls(C_in, C_out, k, stride, padding, dilation, groups, bias, mode)
    layer = layer.double()
    x = torch.randn(n, C_in, *[size + i for i in range(dims)], dtype=torch.float64)

    def losses(x: Tensor) -> Tensor:
        return layer(x).sin().flatten(1).sum(1)  # (n,)

    norms = indigrad.testing.norms_of(indigrad.testing.loop_grads(layer, losses, x))  # (n,)
    max_norm = float(norms.median()) or 1.0  # all-zero gradients happen (only padding seen)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(conv, "_ghost", lambda P, a, b: ghost)
        indigrad.testing.check(layer, losses, x, max_norm=max_norm)


@pytest.mark.parametrize(
    "layer, x_shape",
    [
        (lambda: nn.Conv2d(6, 6, 7, padding=3, groups=6), (3, 6, 2, 3)),
        (lambda: nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=4), (2, 4, 7, 6)),  # ×2
        (lambda: nn.Conv2d(3, 3, (3, 2), stride=(2, 3), dilation=(2, 1), groups=3), (2, 3, 9, 8)),
        (lambda: nn.Conv2d(3, 3, 3, padding=2, padding_mode="reflect", groups=3), (2, 3, 5, 5)),
        (lambda: nn.Conv1d(2, 6, 4, padding="same", groups=2), (3, 2, 7)),
        (lambda: nn.Conv3d(2, 2, 3, stride=2, padding=1, groups=2, bias=False), (2, 2, 5, 4, 5)),
    ],
    ids=["7x7", "multiplier_strided", "dilated_strided", "reflect", "conv1d_same", "conv3d"],
)
def test_depthwise_by_one_convolution(layer, x_shape):
    """A depthwise conv's per-example gradients from one convolution of the batch as
    channels (float32: float64 keeps im2col, its CPU convolution is slow)."""
    _against_im2col(layer, x_shape, lambda layer, x, G: conv._depthwise(layer, x))


def _against_im2col(layer, x_shape, taken):
    """A float32 layer's gradients and norms by the path ``taken(layer, x, G)`` says it
    takes (and not in float64): those of im2col and the batched product from the same
    gradients in float64, and, in a small model, the loop's."""
    torch.manual_seed(0)
    layer = layer().double()
    x = torch.randn(x_shape, dtype=torch.float64)
    G = torch.randn_like(layer(x).detach())  # (n, C_out, *out)
    assert not taken(layer, x, G)  # float64
    exact = conv.conv_grads(layer, (x,), G)  # im2col and the batched product
    layer, x, G = layer.float(), x.float(), G.float()
    assert taken(layer, x, G)
    got = conv.conv_grads(layer, (x,), G)
    sq = conv.conv_sq_norms(layer, (x,), G)
    for k in exact:
        torch.testing.assert_close(got[k], exact[k].float())
    flat = torch.cat([g.flatten(1) for g in exact.values()], 1)  # (n, P)
    torch.testing.assert_close(sum(sq.values()), flat.square().sum(1).float())
    if x.shape[0] <= 3:  # the loop's check, for the small batches
        model = nn.Sequential(layer, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))
        model(x)  # materialise the lazy head
        y = torch.tensor([0, 2, 1])[: x.shape[0]]

        def losses(x, y):
            return F.cross_entropy(model(x), y, reduction="none")

        indigrad.testing.check(model, losses, x, y)
    return got


@pytest.mark.parametrize(
    "layer, x_shape",
    [
        (lambda: nn.Conv2d(16, 16, 3, padding=1), (3, 16, 8, 8)),
        (lambda: nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), (2, 16, 16, 16)),
        (lambda: nn.Conv2d(16, 16, (3, 2), dilation=(2, 1)), (2, 16, 12, 10)),
        (lambda: nn.Conv2d(16, 16, 3, padding=1, padding_mode="reflect"), (2, 16, 8, 8)),
        (lambda: nn.Conv2d(16, 16, 4, padding="same"), (3, 16, 8, 8)),
        # 4.7 MB of gradients, from the buffer pool: chunks of 14 examples, then 4
        (lambda: nn.Conv2d(64, 64, 3, padding=1), (32, 64, 8, 8)),
    ],
    ids=["3x3", "strided", "dilated", "reflect", "same_even_k", "chunked"],
)
def test_per_example_weight_gradients_by_groups(layer, x_shape):
    """A conv's per-example weight gradients from one weight gradient of a conv with the
    examples as its groups (float32 on a CPU: float64 keeps im2col), its norms too."""

    def taken(layer, x, G):  # and the norms materialise, by groups
        return conv._by_groups(layer, x, G) and not conv._ghost(*conv._widths(layer, x, G))

    _against_im2col(layer, x_shape, taken)


@pytest.mark.parametrize(
    "layer, x_shape",
    [
        (lambda: nn.Conv2d(3, 16, 3, padding=1), (2, 3, 8, 8)),  # b = 27: ragged
        (lambda: nn.Conv2d(3, 32, 5, stride=2, bias=False), (3, 3, 13, 11)),  # b = 75
    ],
    ids=["3x3", "5x5_strided"],
)
def test_ragged_width_as_rows(layer, x_shape):
    """A first layer's product with its 3·k² input columns as the rows (float32 on a CPU,
    where that is faster), transposed into place."""

    def taken(layer, x, G):
        return conv._ragged_rows(*conv._factors(layer, x, G))

    got = _against_im2col(layer, x_shape, taken)
    assert got["weight"].is_contiguous()
