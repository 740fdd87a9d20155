"""Every situation that would give a wrong per-example number is an error that says what to do."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import BY_NAME, RecurrentInside, Scale

import indigrad


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _xy(n=6):
    return torch.randn(n, 5, dtype=torch.float64), torch.randint(0, 3, (n,))


def test_zero_dim_loss_says_reduction_none():
    model, (x, y) = _model(), _xy()
    with indigrad.capture(model) as cap, pytest.raises(ValueError, match='reduction="none"'):
        cap.grads(F.cross_entropy(model(x), y))


def test_losses_not_a_tensor():
    model, (x, _) = _model(), _xy()
    with indigrad.capture(model) as cap, pytest.raises(TypeError, match="tensor"):
        model(x)
        cap.grads([1.0, 2.0])


@pytest.mark.parametrize("fix", ["flattened_tokens", "subset"])
def test_losses_length_not_batch_size(fix):
    model, (x, y) = _model(), _xy()
    with indigrad.capture(model) as cap:
        losses = F.cross_entropy(model(x), y, reduction="none")  # (6,)
        if fix == "flattened_tokens":
            losses = torch.stack([losses, losses], 1).reshape(-1)  # (12,)
        else:
            losses = losses[:4]  # (4,)
        with pytest.raises(RuntimeError, match="one loss per example"):
            cap.norms(losses)


@pytest.mark.parametrize("norm", [nn.BatchNorm1d(7), nn.SyncBatchNorm(7)], ids=["bn", "syncbn"])
def test_batchnorm_in_training_mode(norm):
    model = nn.Sequential(nn.Linear(5, 7), norm, nn.Linear(7, 3)).double().train()
    x, _y = _xy()
    with indigrad.capture(model), pytest.raises(RuntimeError, match=r"eval mode.*GroupNorm"):
        model(x)


def test_batchnorm_in_training_mode_outside_a_captured_submodule():
    # above the captured layer, in the rest of the model: the gradient at its output
    # mixes the examples
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Linear(7, 3)).double().train()
    x, y = _xy()
    with indigrad.capture(model[0]) as cap:
        losses = F.cross_entropy(model(x), y, reduction="none")
        with pytest.raises(RuntimeError, match=r"feeds a batch norm in training mode"):
            cap.norms(losses)


@pytest.mark.parametrize(
    "node", ["NativeBatchNormBackward0", "CudnnBatchNormBackward0", "MiopenBatchNormBackward0"]
)
def test_every_batch_norm_node_says_whether_it_trained(node):
    # The graph's check (_graph._mixes) reads it to refuse a batch norm in training mode
    # outside the captured model; cuDNN's and MIOpen's nodes are those a GPU makes.
    assert "_saved_training" in dir(getattr(torch._C._functions, node))


def test_batchnorm_in_training_mode_below_a_captured_head():
    # below every captured layer (a backbone in training mode under a captured head):
    # the head's per-example gradients are those of the batch's own forward
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Linear(7, 3)).double().train()
    x, y = _xy()
    with indigrad.capture(model[2]) as cap:
        losses = F.cross_entropy(model(x), y, reduction="none")
        ref = [torch.autograd.grad(loss, model[2].weight, retain_graph=True)[0] for loss in losses]
        grads = cap.grads(losses)
    torch.testing.assert_close(grads["weight"], torch.stack(ref))


class Counting(nn.Module):
    """Without a rule (its own parameter through exp), counting its calls in a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.zeros(7, dtype=torch.float64))
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

    def forward(self, x):
        self.calls += 1
        return x * self.g.exp() * self.calls


def test_generic_rule_refuses_a_forward_that_updates_its_buffers():
    model = nn.Sequential(nn.Linear(5, 7), Counting(), nn.Linear(7, 3)).double()
    x, y = _xy()
    with indigrad.capture(model) as cap:
        losses = F.cross_entropy(model(x), y, reduction="none")
        with pytest.raises(RuntimeError, match=r"updates its buffers \['calls'\]"):
            cap.grads(losses)
    assert model[1].calls.item() == 1  # the forward's update, and no re-run's


def test_frozen_batchnorm_in_training_mode_still_mixes_examples():
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7, affine=False), nn.Linear(7, 3))
    x, _ = _xy()
    with indigrad.capture(model.double()), pytest.raises(RuntimeError, match="training mode"):
        model(x)


@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm_without_running_stats_mixes_examples_in_eval_mode(affine):
    norm = nn.BatchNorm1d(7, affine=affine, track_running_stats=False)
    model = nn.Sequential(nn.Linear(5, 7), norm, nn.Linear(7, 3)).double().eval()
    x, _ = _xy()
    with indigrad.capture(model), pytest.raises(RuntimeError, match="track_running_stats"):
        model(x)


def test_batchnorm_in_eval_mode_is_accepted_by_capture():
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Linear(7, 3)).double()
    model[1].running_mean.uniform_(-1, 1)
    model.eval()
    x, y = _xy()
    indigrad.testing.check(model, lambda x, y: F.cross_entropy(model(x), y, reduction="none"), x, y)


class FunctionalReuse(nn.Module):
    """Uses fc.weight a second time outside fc's own call."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 5)

    def forward(self, x):
        return F.linear(torch.tanh(self.fc(x)), self.fc.weight)


class ForwardBypass(nn.Module):
    """Calls fc.forward directly, which runs no hooks."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.fc = nn.Linear(5, 5)

    def forward(self, x):
        return self.fc.forward(torch.tanh(self.a(x)))


@pytest.mark.parametrize("cls", [FunctionalReuse, ForwardBypass])
def test_gradient_through_unrecorded_path(cls):
    model = cls().double()
    x, _ = _xy()
    with indigrad.capture(model) as cap, pytest.raises(RuntimeError, match=r"'fc\.(weight|bias)'"):
        cap.grads(model(x).sum(1))


def test_unrecorded_path_of_frozen_parameter_is_fine():
    model = FunctionalReuse().double()
    model.fc.weight.requires_grad_(False)
    x, _ = _xy()
    indigrad.testing.check(model, lambda x: model(x).square().sum(1), x)


def test_forward_consumed_by_a_backward():
    model, (x, y) = _model(), _xy()
    with indigrad.capture(model) as cap:
        losses = F.cross_entropy(model(x), y, reduction="none")
        cap.norms(losses)
        with pytest.raises(RuntimeError, match="already consumed"):
            cap.grads(losses)
        # a fresh forward in the same block works again
        cap.grads(F.cross_entropy(model(x), y, reduction="none"))


def test_no_forward_recorded():
    model, (x, y) = _model(), _xy()
    losses = F.cross_entropy(model(x), y, reduction="none")
    with indigrad.capture(model) as cap, pytest.raises(RuntimeError, match="no forward"):
        cap.grads(losses)


def test_losses_from_a_forward_outside_the_block():
    model, (x, y) = _model(), _xy()
    outside = F.cross_entropy(model(x), y, reduction="none")
    with indigrad.capture(model) as cap:
        model(x)
        with pytest.raises(RuntimeError, match="do not depend on any layer"):
            cap.grads(outside)


def test_losses_without_grad():
    model, (x, _y) = _model(), _xy()
    with indigrad.capture(model) as cap:
        model(x)
        with pytest.raises(RuntimeError, match="no grad_fn"):
            cap.grads(torch.ones(6))


def test_use_outside_the_block():
    model, (x, y) = _model(), _xy()
    cap = indigrad.capture(model)
    with pytest.raises(RuntimeError, match="not active"):
        cap.grads(F.cross_entropy(model(x), y, reduction="none"))
    with cap:
        pass
    with pytest.raises(RuntimeError, match="not active"):
        cap.grads(F.cross_entropy(model(x), y, reduction="none"))


class InPlaceAfterUse(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.b = nn.Linear(5, 3)

    def forward(self, x):
        h = self.a(x)
        out = self.b(h)
        h.mul_(2)  # modifies b's input after b used it
        return out


def test_input_modified_in_place_after_the_call():
    model = InPlaceAfterUse().double()
    x, _ = _xy()
    with indigrad.capture(model) as cap, pytest.raises(RuntimeError, match="modified in place"):
        cap.grads(model(x).sum(1))


@pytest.mark.parametrize("max_norm", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_max_norm(max_norm):
    model, (x, y) = _model(), _xy()
    with indigrad.capture(model) as cap, pytest.raises(ValueError, match="max_norm"):
        cap.clip_(F.cross_entropy(model(x), y, reduction="none"), max_norm=max_norm)


def test_generic_rule_refuses_randomness():
    model = nn.Sequential(nn.Linear(5, 4), DropoutMatmul(4), nn.Linear(4, 3)).double().train()
    x, y = _xy()
    with indigrad.capture(model) as cap, pytest.raises(RuntimeError, match="random numbers"):
        cap.grads(F.cross_entropy(model(x), y, reduction="none"))


@pytest.mark.parametrize("where", ["after", "inside"])
def test_generic_rule_refuses_randomness_one_example_at_a_time(where):
    # vmap cannot batch nn.GRU's fused kernel: the generic rule re-runs the module one
    # example after another, where dropout (after the GRU, or between a 2-layer LSTM's
    # layers) must still be refused, not drawn anew
    class Noisy(RecurrentInside):
        def __init__(self):
            super().__init__(3, 4, 3)
            if where == "inside":
                self.lstm = nn.LSTM(3, 4, num_layers=2, dropout=0.5, batch_first=True)
            self.drop = nn.Dropout(0.5 if where == "after" else 0.0)

        def forward(self, x):
            return self.drop(super().forward(x))

    model = Noisy().double().train()
    x = torch.randn(5, 6, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    with indigrad.capture(model) as cap, pytest.raises(RuntimeError, match="random numbers"):
        cap.grads(F.cross_entropy(model(x), y, reduction="none"))


class DropoutMatmul(nn.Module):
    """A custom layer that the generic rule re-runs (its parameter meets the batch in a
    matmul), with dropout: the re-run could not reproduce the mask."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.eye(d))

    def forward(self, x):
        return F.dropout(x @ self.w, 0.5, self.training)


def test_not_a_module_and_bad_batch_dim():
    with pytest.raises(TypeError, match=r"nn\.Module"):
        indigrad.capture(lambda x: x)
    with pytest.raises(ValueError, match="batch_dim"):
        indigrad.capture(BY_NAME["seed_mlp"].model(), batch_dim=-1)


def test_mode_switched_between_forward_and_backward():
    model, (x, y) = _model(), _xy()
    with indigrad.capture(model) as cap:
        losses = F.cross_entropy(model(x), y, reduction="none")
        model.eval()
        with pytest.raises(RuntimeError, match="switched to eval mode"):
            cap.norms(losses)


@pytest.mark.parametrize("what", ["grads", "norms", "clip_"])
def test_a_rule_returning_the_wrong_number_of_examples(what):
    def one_row(module, inputs, G):  # forgets the batch: (1, d)
        return {"s": (inputs[0] * G).sum(0, keepdim=True), "shift": G.sum(0, keepdim=True)}

    def sq(module, inputs, G):
        return {"s": G[:1, 0] ** 2, "shift": G[:1, 0] ** 2}

    indigrad.register_rule(Scale, grads=one_row, sq_norms=sq)
    try:
        model = nn.Sequential(nn.Linear(5, 4), Scale(4), nn.Linear(4, 3)).double()
        x, y = _xy()
        with indigrad.capture(model) as cap, pytest.raises(RuntimeError, match="expected"):
            losses = F.cross_entropy(model(x), y, reduction="none")
            if what == "clip_":
                cap.clip_(losses, 1.0)
            else:
                getattr(cap, what)(losses)
    finally:
        indigrad.unregister_rule(Scale)


class _Sorted(nn.Module):
    """Sorts the batch (by its first feature, as by length before packing) and back."""

    def __init__(self, bd: int, how: str) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(5, 7), nn.Linear(7, 3)
        self.bd, self.how = bd, how

    def forward(self, x):  # (n, 5), or (2, n, 5) with bd = 1
        order = (x[0, :, 0] if self.bd else x[:, 0]).argsort()
        if self.how == "identity":
            order = order.sort().values  # arange(n): the batch in its order
        take = (lambda t, i: t[:, i]) if self.bd else (lambda t, i: t[i])
        h = take(torch.tanh(self.fc(x)), order)
        return take(self.head(h), order.argsort())


@pytest.mark.parametrize("bd", [0, 1])
@pytest.mark.parametrize("how", ["sorted", "identity"])
def test_a_batch_reordered_inside_the_forward(bd, how):
    # The head sees the examples in another order than the rows of the losses: its rows
    # are not the examples', and each per-example gradient would mix two examples'.
    model = _Sorted(bd, how).double()
    x = torch.randn(6, 5, dtype=torch.float64) if bd == 0 else torch.randn(2, 6, 5).double()

    def losses(x, y):
        out = model(x)
        return out.square().sum(-1) if bd == 0 else out.square().sum((0, 2))

    if how == "identity":
        indigrad.testing.check(model, losses, x, None, batch_dim=bd)
        return
    with indigrad.capture(model, batch_dim=bd) as cap, pytest.raises(RuntimeError, match="order"):
        cap.grads(losses(x, None))


class _Centers(nn.Module):
    """A table of class centres looked up by the labels (center loss), as many as examples."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(5, 3)
        self.centers = nn.Parameter(torch.randn(6, 3))

    def forward(self, x, y):
        return (self.f(x) - self.centers[y]).square().sum(1)  # (n,)


def test_a_table_looked_up_by_the_labels_is_no_reordered_batch():
    torch.manual_seed(0)
    model = _Centers().double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.tensor([2, 0, 3, 1, 5, 4])
    indigrad.testing.check(model, model, x, y)


class _Stash(nn.Module):
    """Without a rule: keeps a tensor of its forward in an attribute, which its parent reads."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 5))
        self.last = None

    def forward(self, x):
        y = x @ self.w
        self.last = y
        return torch.tanh(y)


def test_a_tensor_kept_in_an_attribute_of_a_rerun_module():
    # The re-run takes the gradient at what the call returned: the path through the
    # attribute was lost (w off by 68 %).
    torch.manual_seed(0)
    stash = _Stash().double()
    head = nn.Linear(5, 3).double()
    model = nn.ModuleDict({"stash": stash, "head": head})
    x = torch.randn(4, 5, dtype=torch.float64)

    def losses(x):
        return head(stash(x) + stash.last).square().sum(1)

    with indigrad.capture(model) as cap, pytest.raises(RuntimeError, match="attribute"):
        cap.grads(losses(x))
