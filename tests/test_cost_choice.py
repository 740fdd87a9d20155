"""The per-call cost choice: ghost forms or materialised per-example gradients.

Both paths must give the reference's norms and clipped sums; the choice itself must follow
the documented cost model; a materialising call must compute its gradients once; and
``cap.clip_`` must let go of each call's tensors once its sum is taken.
"""

import dataclasses
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import BY_NAME

import indigrad
from indigrad import quantities
from indigrad.rules import _cost, linear, registry

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("materialise", [True, False], ids=["materialise", "fast"])
@pytest.mark.parametrize("name", ["linear_3d_ghost", "linear_3d_materialise", "linear_4d"])
def test_both_paths_match_the_reference(name, materialise, monkeypatch):
    monkeypatch.setattr(_cost, "materialise_to_clip", lambda *_: materialise)
    model, loss_fn, x, y = BY_NAME[name].build()
    indigrad.testing.check(model, loss_fn, x, y)


def test_cnn_both_paths_match_the_reference(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.GroupNorm(2, 6), nn.ReLU(),
        nn.Conv2d(6, 4, 3, stride=2), nn.Flatten(), nn.LazyLinear(3),
    ).double()  # fmt: skip
    x = torch.randn(5, 3, 7, 7, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    model(x)  # materialise the lazy layer

    def loss_fn(x, y):
        return F.cross_entropy(model(x), y, reduction="none")

    for materialise in (True, False):
        monkeypatch.setattr(_cost, "materialise_to_clip", lambda *_, m=materialise: m)
        indigrad.testing.check(model, loss_fn, x, y)


@pytest.mark.parametrize(
    "T,a,b,device,expected",
    [
        (64, 384, 128, CPU, True),  # a small GPT layer: Grams ≈ 43 a b, passes ≈ 20 a b
        (64, 3072, 768, CPU, False),  # a GPT-2 MLP layer: Grams ≈ 7 a b
        (64, 384, 128, CUDA, False),  # passes cost more multiply-adds on a GPU
        (8, 4, 4, CUDA, True),  # the Grams cost more than materialising even for norms
        (2, 1024, 1024, CPU, False),  # few tokens: the Grams are cheap
        (512, 8192, 8192, CPU, False),  # cheaper, but dW_i would be 8× bigger than A and G
        (512, 4096, 4096, CUDA, False),  # 4× is too much on a GPU too (growth 2)
        (256, 512, 512, CUDA, True),  # GPT attention output: dW_i as big as A and G
        (256, 2048, 512, CUDA, True),  # GPT MLP: dW_i 1.6× A and G (outside a budget)
        (256, 2048, 512, CPU, True),  # the CPU allows dW_i 2× A and G
    ],
)
def test_the_choice_follows_the_cost_model(T, a, b, device, expected):
    assert _cost.materialise_to_clip(T, a, b, device) is expected


@pytest.mark.parametrize("device", [CPU, CUDA])
def test_a_conv_keeps_its_weight_gradients_only_within_the_growth_allowed(device):
    # ResNet-18's first block on 8×8 maps: 64 → 64 channels, 3×3, P = 64 positions. The
    # unfolded input is 9× the input; dW_i (64·576) is 4.5× the input and G (2·64·64):
    # kept on the CPU (growth 5), not on a GPU (growth 2).
    P, a, b = 64, 64, 576
    assert not _cost.ghost_norm(P, a, b)  # materialising is the cheaper norm ...
    held = 2 * 64 * 64
    assert _cost.materialise_to_clip(P, a, b, device, held) is (device.type == "cpu")
    assert not _cost.materialise_to_clip(P, a, b, device, held // 2)  # never kept at 9×
    assert _cost.materialise_to_clip(P, a, b, device, held=a * b)  # kept where it fits


def test_on_a_gpu_kept_gradients_spend_one_budget_per_clipped_sum():
    T, a, b = 256, 2048, 512  # each keeps dW_i of 393 216 elements more than A and G
    extra = a * b - T * (a + b)
    share = _cost._BUDGET_SHARE_DEFAULT
    with _cost.memory_budget(int(1.5 * extra / share), CUDA):  # room for one and a half
        assert _cost.materialise_to_clip(T, a, b, CUDA)
        assert not _cost.materialise_to_clip(T, a, b, CUDA)  # the rest does not fit
        assert _cost.materialise_to_clip(T, 512, 512, CUDA)  # adds nothing: still kept
    assert _cost.materialise_to_clip(T, a, b, CUDA)  # no budget outside
    with _cost.memory_budget(0, CPU):  # no budget on the CPU
        assert _cost.materialise_to_clip(T, a, b, CPU)
        assert _cost.materialise_to_clip(T, a, b, CPU)


def test_a_clipped_sum_keeps_gradients_within_the_budget(monkeypatch):
    # Four Linear layers over tokens that each would add to memory by keeping dW_i; the
    # budget (a share of all calls' inputs and output gradients) admits the first ones.
    monkeypatch.setitem(_cost._BUDGET_SHARE, "cpu", 0.05)
    monkeypatch.setitem(_cost._PASS_COST, "cpu", 0)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(16, 16, bias=False) for _ in range(4)]).double()
    x = torch.randn(3, 4, 16, dtype=torch.float64)  # T = 4: dW_i (256) > A, G (128)
    kept = []
    real = _cost.materialise_to_clip

    def spy(*args):
        kept.append(real(*args))
        return kept[-1]

    monkeypatch.setattr(_cost, "materialise_to_clip", spy)
    with indigrad.capture(model) as cap:
        cap.clip_(model(x).square().sum((1, 2)), max_norm=1.0)
    # held: 4 layers × (A + G) × 64 elements = 512; 5 % = 25.6 < 128 extra: none fits
    assert kept == [False] * 4
    kept.clear()
    monkeypatch.setitem(_cost._BUDGET_SHARE, "cpu", 0.5)  # 256: two of the four
    with indigrad.capture(model) as cap:
        cap.clip_(model(x).square().sum((1, 2)), max_norm=1.0)
    assert kept == [True, True, False, False]
    loss_fn = lambda x: model(x).square().sum((1, 2))  # noqa: E731
    indigrad.testing.check(model, loss_fn, x)  # mixed choices give the reference


def _replace_rule(monkeypatch, cls, rule):
    monkeypatch.setitem(registry._RULES, cls, rule)
    monkeypatch.setattr(registry, "_BY_CLASS", {})  # lookups cached during the test only


def _counting(rule, counts):
    def wrap(name, fn):
        def counted(*args):
            counts[name] = counts.get(name, 0) + 1
            return fn(*args)

        return counted

    fns = {f: getattr(rule, f) for f in ("grads", "sq_norms", "weighted_sum")}
    return dataclasses.replace(rule, **{f: wrap(f, fn) for f, fn in fns.items()})


@pytest.mark.parametrize("materialise", [True, False], ids=["materialise", "fast"])
def test_a_materialising_call_computes_its_gradients_once(materialise, monkeypatch):
    counts: dict[str, int] = {}
    _replace_rule(monkeypatch, nn.Linear, _counting(linear.LINEAR, counts))
    monkeypatch.setattr(_cost, "materialise_to_clip", lambda *_: materialise)
    model = nn.Linear(4, 3)
    x = torch.randn(5, 6, 4)
    with indigrad.capture(model) as cap:
        cap.clip_(model(x).square().sum((1, 2)), max_norm=1.0)
    if materialise:
        assert counts == {"grads": 1}
    else:
        assert counts == {"sq_norms": 1, "weighted_sum": 1}
    # the norms alone never materialise where the ghost form is cheaper
    counts.clear()
    with indigrad.capture(model) as cap:
        cap.norms(model(torch.randn(5, 2, 4)).square().sum((1, 2)))
    assert counts == {"sq_norms": 1}


def test_clip_releases_each_calls_tensors_once_its_sum_is_taken(monkeypatch):
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 2))
    refs: dict[nn.Module, weakref.ref] = {}
    for layer in (model[2], model[4]):  # model[0]'s input stays in its unexecuted node
        layer.register_forward_hook(lambda m, args, out: refs.update({m: weakref.ref(args[0])}))
    summed: list[nn.Module] = []
    alive: list[bool] = []  # at each sum, for each call summed before it: input still alive?
    real = linear.LINEAR.weighted_sum

    def weighted_sum(module, inputs, G, coef):
        gc.collect()
        alive.extend(refs[m]() is not None for m in summed if m in refs)
        summed.append(module)
        return real(module, inputs, G, coef)

    rule = dataclasses.replace(linear.LINEAR, weighted_sum=weighted_sum)
    _replace_rule(monkeypatch, nn.Linear, rule)
    with indigrad.capture(model) as cap:
        cap.clip_(model(torch.randn(3, 4)).square().sum(1), max_norm=1.0)
    # these inputs were only held by the capture, and dropped after their sums
    assert len(summed) == 3 and alive and not any(alive)


@pytest.mark.parametrize("materialise", [True, False], ids=["materialise", "fast"])
def test_materialised_calls_drop_their_inputs_before_the_sums(materialise, monkeypatch):
    monkeypatch.setattr(_cost, "materialise_to_clip", lambda *_: materialise)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 2))
    refs: list[weakref.ref] = []
    model[2].register_forward_hook(lambda m, args, out: refs.append(weakref.ref(args[0])))
    alive_when_summing = []
    order = []
    real = quantities._Entry.weighted_sum

    def weighted_sum(entry, coef, *skip):  # the sums start once every norm is known
        gc.collect()
        alive_when_summing.append(refs[0]() is not None)
        order.append(entry.call.module)
        return real(entry, coef, *skip)

    monkeypatch.setattr(quantities._Entry, "weighted_sum", weighted_sum)
    x = torch.randn(3, 2, 4)  # T = 2 tokens: the cost choice applies
    with indigrad.capture(model) as cap:
        cap.clip_(model(x).square().sum((1, 2)), max_norm=1.0)
    # materialised: the middle layer's input is gone before the first sum; ghost and
    # weighted matmul: it is needed until its own sum
    own = order.index(model[2])
    assert own < 2  # a sum follows its own, so that its release is seen
    expected = [False] * 3 if materialise else [True] * (own + 1) + [False] * (2 - own)
    assert alive_when_summing == expected


def test_clip_sums_first_the_calls_that_free_more_than_they_take(monkeypatch):
    # The head frees its input (n·200) and G (n·2) and takes 402 elements; the first
    # layer takes 20 200 and frees its G (n·200): the head's sum comes first.
    model = nn.Sequential(nn.Linear(100, 200), nn.ReLU(), nn.Linear(200, 2))
    order = []
    real = quantities._Entry.weighted_sum

    def weighted_sum(entry, coef, *skip):
        order.append(entry.call.module)
        return real(entry, coef, *skip)

    monkeypatch.setattr(quantities._Entry, "weighted_sum", weighted_sum)
    with indigrad.capture(model) as cap:
        cap.clip_(model(torch.randn(4, 100)).square().sum(1), max_norm=1.0)
    assert order == [model[2], model[0]]
    order.clear()
    with indigrad.capture(model) as cap:  # kept for more questions: in forward order
        cap.backward(model(torch.randn(4, 100)).square().sum(1)).clip_(max_norm=1.0)
    assert order == [model[0], model[2]]
