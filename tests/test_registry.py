"""The rule registry: registration, MRO lookup, user rules checked by indigrad.testing."""

import pytest
import torch
from torch import nn
from zoo import Scale

import indigrad
from indigrad.rules.linear import LINEAR


class PlainSubclass(nn.Linear):
    pass


class OverridingSubclass(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


def test_linear_is_registered():
    assert indigrad.registered_rules()[nn.Linear] is LINEAR
    assert indigrad.lookup_rule(nn.Linear(2, 2)) is LINEAR


def test_subclass_keeping_forward_uses_parent_rule():
    assert indigrad.lookup_rule(PlainSubclass(2, 2)) is LINEAR
    # nn.MultiheadAttention's out_proj is such a subclass
    assert indigrad.lookup_rule(nn.MultiheadAttention(4, 2).out_proj) is LINEAR


def test_subclass_overriding_forward_falls_back_to_generic():
    assert indigrad.lookup_rule(OverridingSubclass(2, 2)) is None
    model = nn.Sequential(OverridingSubclass(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    indigrad.testing.check(model, lambda x: model(x).square().sum(1), x)


def test_unregistered_module_has_no_rule():
    assert indigrad.lookup_rule(Scale(3)) is None


@pytest.fixture
def scale_rule():
    def grads(module, inputs, G):
        x = inputs[0]  # (n, *, d)
        return {
            "s": (x * G).reshape(x.shape[0], -1, x.shape[-1]).sum(1),  # (n, d)
            "shift": G.reshape(G.shape[0], -1, G.shape[-1]).sum(1),  # (n, d)
        }

    rule = indigrad.register_rule(Scale, grads=grads)
    yield rule
    indigrad.unregister_rule(Scale)


def test_user_rule_is_used_and_checked(scale_rule):
    assert indigrad.lookup_rule(Scale(3)) is scale_rule
    model = nn.Sequential(nn.Linear(4, 3), Scale(3), nn.Linear(3, 2)).double()
    x = torch.randn(6, 2, 4, dtype=torch.float64)
    indigrad.testing.check(model, lambda x: model(x).square().sum((1, 2)), x)


def test_check_catches_a_wrong_rule():
    def wrong(module, inputs, G):
        return {"s": (inputs[0] * G) * 1.001, "shift": G}  # off by 0.1% in s

    indigrad.register_rule(Scale, grads=wrong)
    try:
        model = nn.Sequential(nn.Linear(4, 3), Scale(3), nn.Linear(3, 2)).double()
        x = torch.randn(6, 4, dtype=torch.float64)
        with pytest.raises(AssertionError, match=r"grads\['1.s'\]"):
            indigrad.testing.check(model, lambda x: model(x).square().sum(1), x)
    finally:
        indigrad.unregister_rule(Scale)


def test_register_validates_its_arguments():
    with pytest.raises(TypeError, match=r"nn\.Module"):
        indigrad.register_rule(int, grads=lambda *a: {})
    with pytest.raises(TypeError, match="grads="):
        indigrad.register_rule(Scale)
    with pytest.raises(TypeError, match="not both"):
        indigrad.register_rule(Scale, LINEAR, grads=lambda *a: {})


@pytest.mark.parametrize("num_parameters", [1, 4])
@pytest.mark.parametrize("shape", [(6, 4), (6, 4, 3), (6, 4, 3, 2)], ids=["2d", "3d", "4d"])
def test_prelu(num_parameters, shape):
    torch.manual_seed(0)
    model = nn.Sequential(nn.PReLU(num_parameters, init=0.3)).double()
    head = nn.Linear(4, 2).double()
    x = torch.randn(shape, dtype=torch.float64)

    def losses(x):
        h = model(x).movedim(1, -1)  # (n, *, 4)
        return head(h).sin().reshape(x.shape[0], -1).sum(1)

    assert indigrad.lookup_rule(model[0]) is not None
    indigrad.testing.check(model, losses, x)


def test_rule_by_qualified_name():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    from indigrad.rules.linear import HF_CONV1D

    assert indigrad.lookup_rule(Conv1D(3, 4)) is HF_CONV1D
    assert "transformers.pytorch_utils.Conv1D" in indigrad.registered_rules()
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(6, 4), nn.Tanh(), Conv1D(3, 6)).double()
    for shape in [(5, 4), (5, 7, 4)]:
        x = torch.randn(shape, dtype=torch.float64)
        indigrad.testing.check(model, lambda x: model(x).square().flatten(1).sum(1), x)
