"""Same-shaped convs taken together (``indigrad/_stack.py``): the stacked norms and clipped
sums against the per-example loop in float64, which calls are stacked, and which are not.

Stacking is a GPU's choice (``conv._STACKED``); here it is turned on for the CPU.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import indigrad
from indigrad import _stack, testing
from indigrad.rules import _cost, conv

GROWTH = _stack._GROWTH  # the library's own, before a test replaces it


class Plans(list):
    """Each plan's stacks for the norms, as lists of the calls' names; ``sums``: those for
    the weighted sums."""

    sums: list[list[str]]


def _names(stacks: dict[int, Any]) -> list[str]:
    unique = {id(s): s for s in stacks.values()}.values()
    return sorted(",".join(e.call.name for e in s.members) for s in unique)


@pytest.fixture(params=["auto", "ghost"])
def stacked(request: Any, monkeypatch: pytest.MonkeyPatch) -> Plans:
    """Stacking on for the CPU, of any size; each plan's stacks. Under "ghost", no call
    keeps its gradients for a clipped sum: every conv's sum is stacked."""
    monkeypatch.setattr(conv, "_STACKED", conv._STACKED | {"cpu"})
    monkeypatch.setattr(_stack, "_GROWTH", 1e9)
    if request.param == "ghost":
        monkeypatch.setattr(_cost, "materialise_to_clip", lambda *_: False)
    plans = Plans()
    plans.sums = []
    real = _stack.plan

    def plan(entries: list[Any]) -> _stack.Plan:
        stacks = real(entries)
        plans.append(_names(stacks.norms))
        plans.sums.append(_names(stacks.sums))
        return stacks

    monkeypatch.setattr(_stack, "plan", plan)
    return plans


class Convs(nn.Module):
    """Convs of the same shape in a row (stacked), and others beside them that differ in one
    option each (each in a stack of its own kind, or none)."""

    def __init__(self) -> None:
        super().__init__()
        self.same = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(3))
        self.no_bias = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1, bias=False) for _ in range(2))
        self.dilated = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=2, dilation=2) for _ in range(2))
        self.strided = nn.ModuleList(nn.Conv2d(4, 4, 3, 2, 1, bias=False) for _ in range(2))
        self.grouped = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1, groups=2) for _ in range(2))
        self.reflect = nn.ModuleList(
            nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect") for _ in range(2)
        )
        self.same_padding = nn.ModuleList(nn.Conv2d(4, 4, 3, padding="same") for _ in range(2))
        self.wide = nn.ModuleList(nn.Conv1d(4, 6, 2) for _ in range(2))
        self.head = nn.Linear(4 * 8 * 8 + 4 * 2 * 2 + 6 * 7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for group in (self.same, self.no_bias, self.dilated, self.grouped, self.reflect):
            for c in group:
                x = torch.tanh(c(x))
        for c in self.same_padding:
            x = torch.tanh(c(x))
        s = x
        for c in self.strided:
            s = torch.tanh(c(s))  # (n, 4, 4, 4), then (n, 4, 2, 2): not the same shape
        w = x.mean(3)  # (n, 4, 8)
        w = sum(torch.tanh(c(w)) for c in self.wide)  # (n, 6, 7)
        return self.head(torch.cat([x.flatten(1), s.flatten(1), w.flatten(1)], 1))


def _plans(stacked: list[list[str]]) -> list[str]:
    """The one plan of a check's norms and clipped sums (none where the gradients came
    first: from them, nothing is stacked); of the sums' stacks with ``stacked.sums``."""
    plans = [plan for plan in stacked if plan]
    assert plans and all(plan == plans[0] for plan in plans), stacked
    return plans[0]


def _check(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    testing.check(model, lambda x, y: F.cross_entropy(model(x), y, reduction="none"), x, y)


def test_stacked_convs_match_the_loop(stacked):
    torch.manual_seed(0)
    model = Convs().double()
    x = torch.randn(5, 4, 8, 8, dtype=torch.float64)
    _check(model, x, torch.arange(5) % 3)
    # not the strided convs (the second sees a 4×4 input: another shape), nor ever the
    # grouped, reflect-padded and padding="same" ones
    expected = [
        "dilated.0,dilated.1",
        "no_bias.0,no_bias.1",
        "same.0,same.1,same.2",
        "wide.0,wide.1",
    ]
    assert _plans(stacked) == expected, stacked


def test_stacked_and_unstacked_agree(monkeypatch):
    """The clipped sums and norms with stacks are those without, up to rounding."""
    torch.manual_seed(1)
    model = Convs()
    x, y = torch.randn(6, 4, 8, 8), torch.arange(6) % 3

    def step() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with indigrad.capture(model) as cap:
            norms = cap.clip_(F.cross_entropy(model(x), y, reduction="none"), max_norm=0.5)
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        return norms, grads

    norms, grads = step()
    monkeypatch.setattr(conv, "_STACKED", conv._STACKED | {"cpu"})
    norms_s, grads_s = step()
    torch.testing.assert_close(norms_s, norms)
    for k, g in grads.items():
        torch.testing.assert_close(grads_s[k], g, msg=k)


def test_stacked_sums_become_grads_uncopied(monkeypatch):
    """A stack's sums are disjoint views of one buffer made for them: each becomes its
    parameter's ``.grad`` without a copy, and a second clipped sum adds into them."""
    monkeypatch.setattr(conv, "_STACKED", conv._STACKED | {"cpu"})
    monkeypatch.setattr(_stack, "_GROWTH", 1e9)
    monkeypatch.setattr(_cost, "materialise_to_clip", lambda *_: False)  # sums stacked
    torch.manual_seed(1)
    model = Convs().double()
    x, y = torch.randn(6, 4, 8, 8, dtype=torch.float64), torch.arange(6) % 3

    def losses(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x), y, reduction="none")

    for _ in range(2):
        with indigrad.capture(model) as cap:
            cap.clip_(losses(x, y), max_norm=0.5)
        grads = [c.weight.grad for c in model.same]
        assert all(g is not None and g._base is not None for g in grads)
        assert len({g.untyped_storage().data_ptr() for g in grads}) == 1  # one buffer
    ref = testing.clipped_sum(testing.loop_grads(model, losses, x, y), 0.5)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * ref[k], msg=k)  # the second added in


def test_a_conv_used_twice_is_not_stacked(stacked):
    """A shared weight's norm needs the cross terms of its uses: its calls stay apart."""
    torch.manual_seed(2)
    shared = nn.Conv2d(3, 3, 3, padding=1)
    other = nn.ModuleList(nn.Conv2d(3, 3, 3, padding=1) for _ in range(2))
    model = nn.Sequential(shared, nn.Tanh(), other[0], nn.Tanh(), shared, other[1], nn.Flatten())
    model = model.double()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    testing.check(model, lambda x: model(x).square().sum(1), x)
    assert _plans(stacked) == ["2,5"]
    stacked.clear()
    a, b, c = (nn.Conv2d(3, 3, 3, padding=1) for _ in range(3))
    b.weight = a.weight  # tied weights, biases of their own
    model = nn.Sequential(a, nn.Tanh(), b, nn.Tanh(), c, nn.Flatten()).double()
    testing.check(model, lambda x: model(x).square().sum(1), x)
    assert stacked and not any(stacked), stacked


def test_stacks_are_as_large_as_their_memory_allows(stacked, monkeypatch):
    """A stack's im2col may be at most ``_GROWTH`` times the largest of one call's."""
    torch.manual_seed(3)
    model = nn.Sequential(
        *(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Tanh()) for _ in range(5)),
        nn.Flatten(),
    ).double()
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    monkeypatch.setattr(_stack, "_GROWTH", 2.5)  # two at a time
    testing.check(model, lambda x: model(x).square().sum(1), x)
    assert _plans(stacked) == ["0.0,1.0", "2.0,3.0"]
    # the sums copy each call's input and output gradient (2·4·8·8 elements per
    # example), not its im2col (4·9·8·8): all five fit together
    assert _plans(stacked.sums) == ["0.0,1.0,2.0,3.0,4.0"]
    stacked.clear()
    stacked.sums.clear()
    monkeypatch.setattr(_stack, "_GROWTH", 1.5)  # none: two would make twice the largest
    summed: list[int] = []  # the calls each stacked weighted sum takes
    weighted_sum = _stack._Stacked.weighted_sum

    def counted(self: Any, entry: Any, coef: torch.Tensor) -> Any:
        if self._sums is None or self._sums[0] is not coef:
            summed.append(len(self.members))
        return weighted_sum(self, entry, coef)

    monkeypatch.setattr(_stack._Stacked, "weighted_sum", counted)
    monkeypatch.setattr(_cost, "materialise_to_clip", lambda *_: False)  # no kept gradients
    testing.check(model, lambda x: model(x).square().sum(1), x)
    assert stacked and not any(stacked), stacked
    assert _plans(stacked.sums) == ["0.0,1.0,2.0,3.0,4.0"]  # 5 · 2·4·64 ≤ 1.5 · 4·9·64
    assert summed and set(summed) == {5}  # the sums are taken by their own stacks
    stacked.clear()
    stacked.sums.clear()
    monkeypatch.setattr(_stack, "_GROWTH", 0.5)  # the sums two at a time: 4 ≤ 0.5 · 9 < 6
    testing.check(model, lambda x: model(x).square().sum(1), x)
    assert _plans(stacked.sums) == ["0.0,1.0", "2.0,3.0"]


def test_frozen_weights_and_parameter_subsets(stacked):
    """Calls whose trainable parameters differ are not stacked together."""
    torch.manual_seed(4)
    convs = [nn.Conv2d(3, 3, 3, padding=1) for _ in range(4)]
    convs[1].weight.requires_grad_(False)
    model = nn.Sequential(*convs, nn.Flatten()).double()
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    testing.check(model, lambda x: model(x).square().sum(1), x)
    assert _plans(stacked) == ["0,2,3"]
    stacked.clear()
    with indigrad.capture(model, params=["0.weight", "0.bias", "2.weight", "3.bias"]) as cap:
        cap.clip_(model(x).square().sum(1), max_norm=1.0)
    assert stacked == [[]], stacked  # 0 and 2 differ in their bias, 3 has no weight


def test_resnet18_under_a_gpus_settings(stacked, monkeypatch):
    """torchvision's ResNet-18 (GroupNorm) with every GPU setting (``act_as``), stacks
    included: within each stage but the first, the convs of one shape are taken together."""
    from pathlib import Path

    from indigrad import bench

    pytest.importorskip("torchvision")
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    from host_ops import act_as

    act_as("cuda", monkeypatch.setattr)
    monkeypatch.setattr(_stack, "_GROWTH", GROWTH)  # the library's own limit
    p = bench.resnet18_problem(batch=2)
    model = p.model().double()
    testing.check(model, lambda x, y: p.loss(model(x), y), p.x.double(), p.y)
    later = [
        "layer2.0.conv2,layer2.1.conv1,layer2.1.conv2",
        "layer3.0.conv2,layer3.1.conv1,layer3.1.conv2",
        "layer4.0.conv2,layer4.1.conv1,layer4.1.conv2",
    ]
    assert _plans(stacked) == later  # not layer1's: its four convs' im2col are the largest
    layer1 = "layer1.0.conv1,layer1.0.conv2,layer1.1.conv1,layer1.1.conv2"
    assert _plans(stacked.sums) == [layer1, *later]  # their sums copy only x and G


# -- GroupNorms of one shape: dγ and dβ from one kernel call, into the joint -------------


class Norms(nn.Module):
    """A stage of same-shaped GroupNorms (with one frozen γ among them, and one without
    affine parameters), each after a conv that keeps the activations apart."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(6))
        self.same = nn.ModuleList(nn.GroupNorm(2, 4) for _ in range(3))
        self.frozen = nn.ModuleList(nn.GroupNorm(2, 4) for _ in range(2))
        self.groups = nn.GroupNorm(4, 4)  # another grouping: a stack of one, its own
        for norm in self.frozen:
            norm.weight.requires_grad_(False)
        self.head = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norms = [*self.same, *self.frozen, self.groups]
        for c, norm, scale in zip(self.convs, norms, [1.0, 2.0, -1.0, 0.5, 3.0, 1.5], strict=True):
            x = torch.tanh(norm(c(x)) * scale)
        return self.head(x.flatten(1))


@pytest.fixture
def gn_stacked(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """GroupNorm's kernel and its stacks on for the CPU; the number of calls each kernel
    call took, in order."""
    from indigrad.rules import normalization

    monkeypatch.setattr(normalization, "_GN_KERNEL_DEVICES", {"cpu"})
    monkeypatch.setattr(normalization, "_GN_STACKED", {"cpu"})
    monkeypatch.setattr(_stack, "_GROWTH", 1e9)
    taken: list[int] = []
    real = normalization._GN_SUMS

    def sums(G: torch.Tensor, *rest: Any) -> Any:
        taken.append(G.shape[1] // 4)  # (n, k·C, *): k calls of C = 4 channels
        return real(G, *rest)

    monkeypatch.setattr(normalization, "_GN_SUMS", sums)
    return taken


def _norms_problem() -> tuple[nn.Module, Any, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = Norms().double()
    x = torch.randn(5, 4, 5, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    return model, lambda x, y: F.cross_entropy(model(x), y, reduction="none"), x, y


def test_same_shaped_group_norms_take_their_sums_together(gn_stacked: list[int]) -> None:
    model, loss_fn, x, y = _norms_problem()
    testing.check(model, loss_fn, x, y)
    with indigrad.capture(model) as cap:
        gn_stacked.clear()
        cap.clip_(loss_fn(x, y), 1.0)
    # one kernel call for the three alike, one for the two frozen, one for the other grouping
    assert sorted(gn_stacked) == [1, 2, 3]


def test_stacked_group_norms_agree_with_one_by_one(
    gn_stacked: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    from indigrad.rules import normalization

    model, loss_fn, x, y = _norms_problem()
    got = {}
    for stacked in (True, False):
        if not stacked:
            monkeypatch.setattr(normalization, "_GN_STACKED", set())
        with indigrad.capture(model) as cap:
            per_example = cap.backward(loss_fn(x, y))
            norms = per_example.norms()
            per_example.clip_(1.0)
        sums = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        got[stacked] = norms, sums
        model.zero_grad(set_to_none=True)
    torch.testing.assert_close(got[True][0], got[False][0], rtol=1e-12, atol=0)
    for k in got[False][1]:
        torch.testing.assert_close(got[True][1][k], got[False][1][k], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("most, kernels", [(1, [1] * 6), (2, [1, 1, 2, 2])])
def test_group_norm_stacks_are_as_large_as_the_joint_takes(
    gn_stacked: list[int], monkeypatch: pytest.MonkeyPatch, most: int, kernels: list[int]
) -> None:
    from indigrad import _joint

    monkeypatch.setattr(_joint, "_MAX_ELEMENTS", {"cpu": 5 * 4 * most})  # most calls' (n, C)
    model, loss_fn, x, y = _norms_problem()
    testing.check(model, loss_fn, x, y)
    with indigrad.capture(model) as cap:
        gn_stacked.clear()
        cap.clip_(loss_fn(x, y), 1.0)
    assert sorted(gn_stacked) == kernels  # no stack made that the joint would refuse


def test_group_norm_stacks_of_the_captured_parameters(
    gn_stacked: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    from indigrad.rules import normalization

    model, loss_fn, x, y = _norms_problem()
    params = [p for k, p in model.named_parameters() if p.requires_grad and k != "same.0.weight"]
    got = []
    for stacked in (True, False):
        if not stacked:
            monkeypatch.setattr(normalization, "_GN_STACKED", set())
        with indigrad.capture(model, params=params) as cap:
            gn_stacked.clear()
            got.append(cap.norms(loss_fn(x, y)))
        if stacked:
            # same.0, its bias alone captured, with the frozen pair; same.1 and same.2; the other
            assert sorted(gn_stacked) == [1, 2, 3]
    torch.testing.assert_close(got[0], got[1], rtol=1e-12, atol=0)


def test_group_norm_stacks_copy_at_most_what_the_growth_allows(
    gn_stacked: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # a stack copies its calls' inputs and output gradients: two calls of one size are
    # twice the largest call's, more than _GROWTH = 1.5 allows
    monkeypatch.setattr(_stack, "_GROWTH", GROWTH)
    model, loss_fn, x, y = _norms_problem()
    with indigrad.capture(model) as cap:
        gn_stacked.clear()
        cap.clip_(loss_fn(x, y), 1.0)
    assert sorted(gn_stacked) == [1, 1, 1, 1, 1, 1]
    monkeypatch.setattr(_stack, "_GROWTH", 2.0)
    with indigrad.capture(model) as cap:
        gn_stacked.clear()
        cap.clip_(loss_fn(x, y), 1.0)
    assert sorted(gn_stacked) == [1, 1, 2, 2]  # the three alike in a pair and one alone
