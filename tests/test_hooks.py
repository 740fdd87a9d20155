"""Nothing is left on the model after the block: not on success, not after an exception."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import CASES

import indigrad


def _state(model):
    """Everything a capture could leave behind on a module, and its global hooks."""
    from torch.nn.modules import module as torch_module

    global_hooks = [
        dict(getattr(torch_module, name))
        for name in (
            "_global_forward_hooks",
            "_global_forward_hooks_with_kwargs",
            "_global_forward_hooks_always_called",
            "_global_forward_pre_hooks",
        )
    ]
    return global_hooks + [
        (
            name,
            sorted(vars(m)),
            dict(m._forward_hooks),
            dict(m._forward_hooks_with_kwargs),
            dict(m._forward_pre_hooks),
            dict(m._forward_pre_hooks_with_kwargs),
            dict(m._backward_hooks),
            dict(m._backward_pre_hooks),
            m.training,
            [(k, p.requires_grad, p.grad is None) for k, p in m.named_parameters(recurse=False)],
        )
        for name, m in model.named_modules()
    ]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_nothing_left_after_success(case):
    model, loss_fn, x, y = case.build()
    model.register_forward_hook(lambda *a: None)  # a user's own hook stays
    before = _state(model)
    with indigrad.capture(model, batch_dim=case.batch_dim) as cap:
        cap.norms(loss_fn(x, y))
    assert _state(model) == before
    assert cap._calls == [] and cap._handles == []


def test_nothing_left_after_an_exception():
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Linear(7, 3)).double()
    before = _state(model)
    with pytest.raises(RuntimeError, match="training mode"), indigrad.capture(model):
        model(torch.randn(4, 5, dtype=torch.float64))
    assert _state(model) == before

    with pytest.raises(KeyError), indigrad.capture(model):
        raise KeyError("user code failed inside the block")
    assert _state(model) == before


def test_nothing_left_after_a_failed_quantity():
    model = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3)).double()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    before = _state(model)
    with pytest.raises(ValueError), indigrad.capture(model) as cap:
        cap.grads(F.cross_entropy(model(x), y))  # 0-d loss
    assert _state(model) == before


def test_block_does_not_keep_the_graph_alive():
    import gc
    import weakref

    model = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3))
    x = torch.randn(4, 5)
    with indigrad.capture(model) as cap:
        out = model(x)
        ref = weakref.ref(out)
        cap.norms(out.sum(1))
        del out
    gc.collect()
    assert ref() is None


def test_a_thousand_steps_leave_nothing_alive():
    import gc
    import weakref

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = _state(model)
    caps, outputs = [], []
    for step in range(1000):
        x, y = torch.randn(4, 4), torch.randint(0, 2, (4,))
        with indigrad.capture(model) as cap:
            out = model(x)
            cap.clip_(F.cross_entropy(out, y, reduction="none"), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0:
            caps.append(weakref.ref(cap))
            outputs.append(weakref.ref(out))
    del cap, out
    gc.collect()
    assert all(r() is None for r in caps + outputs)
    assert _state(model) == before
