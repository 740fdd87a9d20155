"""No step of indigrad makes the host wait for the device.

On a GPU the host queues kernels ahead of the device. An operator whose result the host
must read (``.item()``, a tensor's truth value, ``nonzero``, ``unique``) makes it wait
until every kernel queued before it has run, so the host's work and the device's no longer
overlap; and a step with such an operator cannot be captured as a CUDA graph, the remedy
for steps bound by the host. Run on CPU tensors, each method's step, under the rules' GPU
settings and each cost choice, must dispatch none of them.

Known exception, by design: ``nn.EmbeddingBag`` with 1-d ids and ``offsets`` reads the
offsets on the host to refuse ones that would give wrong per-example results.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from zoo import CASES

import indigrad
from indigrad import bench
from indigrad.rules import _cost, normalization

# operators whose result the host reads, by overload packet
_WAITS = {
    "_local_scalar_dense",  # .item(), int(t), float(t), bool(t)
    "item",
    "is_nonzero",
    "nonzero",
    "masked_select",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "unique_dim_consecutive",
    "equal",
}
_INDEXING = {"index", "index_put", "index_put_", "_index_put_impl", "_index_put_impl_"}


class _Waits(TorchDispatchMode):
    """Records the operators dispatched within it that make the host wait for the device."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        # repeat_interleave with tensor repeats must read their sum to size its output
        counts = name == "repeat_interleave" and len(args) < 3 and args[0].dim() > 0
        # indexing by a boolean mask must count its true entries to size its output
        masks = name in _INDEXING and any(
            isinstance(i, Tensor) and i.dtype == torch.bool for i in args[1]
        )
        if name in _WAITS or masks or (counts and kwargs.get("output_size") is None):
            self.seen.append(str(func))
        return func(*args, **kwargs)


def _waits(step: Callable[[], Any]) -> list[str]:
    with _Waits() as mode:
        step()
    return mode.seen


def test_the_detector_sees_what_waits():
    x = torch.randn(4, 3)
    assert _waits(lambda: x.sum().item()) == ["aten._local_scalar_dense.default"]
    assert _waits(lambda: bool(x.sum() > 0))
    assert _waits(lambda: x[x > 0])
    assert _waits(lambda: x.clone().index_put_((x > 0,), torch.tensor(0.0)))
    assert not _waits(lambda: x[torch.tensor([0, 2])])
    assert _waits(lambda: torch.unique(x))
    assert _waits(lambda: torch.arange(3).repeat_interleave(torch.tensor([1, 2, 0])))
    assert not _waits(lambda: torch.arange(3).repeat_interleave(2))
    assert not _waits(lambda: (x * 2).sort())


# -- the models -------------------------------------------------------------------------------


class _Seq(nn.Module):
    """Token model: embedding, a module on (n, T, d), a head; token losses summed."""

    def __init__(self, body: nn.Module, vocab: int = 11, d: int = 8, **options: Any) -> None:
        super().__init__()
        self.emb, self.body = nn.Embedding(vocab, d, **options), body
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.body(self.emb(ids))
        return self.head(h[0] if isinstance(h, tuple) else h)


class _Bag(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.bag, self.out = nn.EmbeddingBag(13, 6, mode=mode, padding_idx=0), nn.Linear(6, 3)

    def forward(self, ids: Tensor) -> Tensor:
        return self.out(self.bag(ids))  # ids (n, L): one bag per row


class _ScaledEmbedding(nn.Embedding):
    """A forward of its own: the lookup is read from the graph."""

    def forward(self, ids: Tensor) -> Tensor:
        return super().forward(ids) * 2.0


def _scaled() -> nn.Module:
    model = _Seq(nn.Identity())
    model.emb = _ScaledEmbedding(11, 8, padding_idx=0)
    return model


class _Cross(nn.Module):
    """Cross-attention on the first positions: key is value, read from the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:  # (n, T, d)
        memory = x[:, :3]
        return self.attn(x, memory, memory, need_weights=False)[0]


def _token_losses(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    logits = model(x)  # (n, T, V)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).sum(1)


def _class_losses(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(model(x), y, reduction="none")


def _ids(n: int, T: int, V: int = 11) -> Tensor:
    return torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(0))


def _convs() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding="same", groups=2, padding_mode="reflect"),
        nn.InstanceNorm2d(4, affine=True),
        nn.ConvTranspose2d(4, 3, 3, stride=2), nn.Flatten(), nn.LazyLinear(3),
    )  # fmt: skip


def _batch_norm_eval() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3)
    )
    model[1].eval()  # running statistics: no example mixes with another
    return model


def _images(model: Callable[[], nn.Module], shape: tuple[int, ...], classes: int) -> Any:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    return model, x, torch.randint(0, classes, (shape[0],)), _class_losses


def _tokens(body: Callable[[], nn.Module], n: int, T: int) -> Any:
    return lambda: _Seq(body()), _ids(n, T), _ids(n, T), _token_losses


MODELS: dict[str, Callable[[], Any]] = {
    # embedding Gram (T ≤ 32) and sorted segments (T > 32), MHA, LayerNorm, GELU MLP
    "transformer": lambda: _tokens(
        lambda: nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 3, 5
    ),
    "long_sequence": lambda: _tokens(lambda: nn.Linear(8, 8), 2, 40),
    "lstm": lambda: _tokens(lambda: nn.LSTM(8, 8, batch_first=True), 3, 4),
    "gru": lambda: _tokens(lambda: nn.GRU(8, 8, num_layers=2, batch_first=True), 3, 4),
    "rms_norm": lambda: _tokens(lambda: nn.RMSNorm(8), 3, 4),
    "embedding_options": lambda: (
        lambda: _Seq(nn.Identity(), scale_grad_by_freq=True, padding_idx=0),
        _ids(3, 6),
        _ids(3, 6),
        _token_losses,
    ),
    **{
        f"embedding_bag_{mode}": lambda mode=mode: (
            lambda: _Bag(mode),
            _ids(4, 5, 13),
            torch.randint(0, 3, (4,)),
            _class_losses,
        )
        for mode in ("sum", "mean", "max")
    },
    "convs": lambda: _images(_convs, (3, 3, 6, 6), 3),
    "batch_norm_eval": lambda: _images(_batch_norm_eval, (3, 3, 5, 5), 3),
    "rnn": lambda: _tokens(lambda: nn.RNN(8, 8, batch_first=True), 3, 4),
    "scaled_embedding": lambda: (_scaled, _ids(3, 6), _ids(3, 6), _token_losses),
    "cross_attention": lambda: _tokens(_Cross, 3, 5),
    "weight_norm": lambda: _images(
        lambda: nn.Sequential(
            nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 4, 3)),
            nn.Flatten(),
            nn.LazyLinear(3),
        ),
        (3, 3, 5, 5),
        3,
    ),
    "conv1d": lambda: _images(
        lambda: nn.Sequential(nn.Conv1d(2, 3, 3, stride=2), nn.Flatten(), nn.LazyLinear(2)),
        (3, 2, 9),
        2,
    ),
}


def _bench_problem(name: str) -> Any:
    sizes = {
        "mlp": lambda: bench.mlp_problem(12, [16, 8], 5, batch=4),
        "cnn": lambda: bench.cnn_problem(batch=3, width=8),
        "resnet18": lambda: bench.resnet18_problem(batch=2),
        "gpt": lambda: bench.gpt_problem(2, 2, 16, 2, 40, 30),
    }
    if name == "resnet18":
        pytest.importorskip("torchvision")
    p = sizes[name]()
    return p.make_model, p.x, p.y, lambda model, x, y: p.loss(model(x), y)


for _name in ("mlp", "cnn", "resnet18", "gpt"):
    MODELS[f"zoo_{_name}"] = lambda _name=_name: _bench_problem(_name)
for _case in CASES:
    if _case.batch_dim == 0:

        def _from_case(case: Any = _case) -> Any:
            model, _, x, y = case.build(torch.float32)
            return lambda: model, x, y, case.loss

        MODELS[f"case_{_case.name}"] = _from_case


# -- the settings --------------------------------------------------------------------------------


@pytest.fixture(params=["cpu", "gpu"])
def settings(request: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    """The rules' CPU settings, or a GPU's (``benchmarks/host_ops.py``'s ``act_as``: no
    buffer pool, no ``F.unfold``, GroupNorm's kernel, the cost tables' defaults)."""
    if request.param == "gpu":
        monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
        from host_ops import act_as

        act_as("cuda", monkeypatch.setattr)
        assert "cpu" in normalization._GN_KERNEL_DEVICES and not _cost._PASS_COST
    return request.param


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("choice", ["auto", "ghost", "materialise"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_no_step_waits_for_the_device(name, choice, settings, monkeypatch):
    if choice != "auto":
        monkeypatch.setattr(_cost, "materialise_to_clip", lambda *_: choice == "materialise")
    make, x, y, loss = MODELS[name]()
    torch.manual_seed(0)
    model = make()
    model(x)  # lazy layers take their shapes

    def step(method: str) -> None:
        with indigrad.capture(model) as cap:
            losses = loss(model, x, y)
            if method == "clip_":
                cap.clip_(losses, max_norm=1.0)
            else:
                getattr(cap, method)(losses)

    step("grads")  # the first step at these shapes is checked, and waits for the answer
    for method in ("grads", "norms", "clip_"):
        assert _waits(lambda method=method: step(method)) == [], method


def test_embedding_bag_with_offsets_reads_them_on_the_host():
    bag = nn.EmbeddingBag(10, 4)
    ids, offsets = torch.tensor([1, 2, 3, 4, 5]), torch.tensor([0, 2])

    def step() -> None:
        with indigrad.capture(bag) as cap:
            cap.norms(bag(ids, offsets).sum(1))

    assert _waits(step)  # the documented exception: checked, not trusted
