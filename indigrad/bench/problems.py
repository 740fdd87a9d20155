"""The benchmark zoo: models and batches, sized per device.

Each problem builds a fresh model on demand (every method times its own copy, so that a
peer library that wraps or extends a model cannot affect another method), a batch, and a
per-example loss ``loss(output, y) -> (n,)`` or ``(n, T)``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MLP(nn.Module):
    """Hidden Linear layers with ReLU and an output layer (the seed's architecture, with
    ``num_classes`` outputs)."""

    def __init__(self, input_size: int, hidden_sizes: list[int], num_classes: int = 1) -> None:
        super().__init__()
        self.act = F.relu
        sizes = [input_size, *hidden_sizes]
        self.hidden_layers = nn.ModuleList([nn.Linear(i, o) for i, o in itertools.pairwise(sizes)])
        self.output_layer = nn.Linear(hidden_sizes[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.hidden_layers:
            x = self.act(layer(x))
        return self.output_layer(x)


def small_cnn(num_classes: int = 10, width: int = 32) -> nn.Sequential:
    """A CIFAR-style CNN with GroupNorm: 3 conv blocks, global pooling, a linear head."""
    w = width
    return nn.Sequential(
        nn.Conv2d(3, w, 3, padding=1), nn.GroupNorm(8, w), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(w, 2 * w, 3, padding=1), nn.GroupNorm(8, 2 * w), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.GroupNorm(8, 2 * w), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * w, num_classes),
    )  # fmt: skip


class Block(nn.Module):
    """A pre-norm transformer block: causal self-attention (Linear q/k/v + SDPA) and MLP."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:  # (n, T, d)
        n, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)  # 3 × (n, T, d)
        q, k, v = (t.view(n, T, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (n, heads, T, d / heads)
        x = x + self.proj(a.transpose(1, 2).reshape(n, T, d))  # (n, T, d)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))  # (n, T, d)


class GPT(nn.Module):
    """A GPT-style language model: token and position embeddings (the latter of
    ``arange(T)``, shared by the batch), transformer blocks, a final LayerNorm, a head."""

    def __init__(self, vocab: int, d: int, layers: int, heads: int, max_len: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(max_len, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids: Tensor) -> Tensor:  # (n, T)
        pos = self.pos(torch.arange(ids.shape[1], device=ids.device))  # (T, d)
        return self.head(self.ln(self.blocks(self.tok(ids) + pos)))  # (n, T, vocab)


@dataclass
class Problem:
    """A model factory, a batch, and a per-example loss ``loss(model(x), y)``."""

    name: str
    make_model: Callable[[], nn.Module]
    x: Tensor
    y: Tensor
    loss: Callable[[Tensor, Tensor], Tensor]

    @property
    def batch(self) -> int:
        return self.x.shape[0]

    @property
    def device(self) -> torch.device:
        return self.x.device

    def model(self) -> nn.Module:
        """A fresh copy of the model (same weights every time), on the batch's device."""
        torch.manual_seed(0)
        return self.make_model().to(self.device)


def _cross_entropy(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out, y, reduction="none")  # (n,)


def _token_cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    # over (n·T, V) rows, as language models compute it: the (n, V, T) layout takes a
    # kernel several times slower (14 of a plain step's 51 ms on an H200), which would
    # flatter every method's ratio to plain
    n, T, V = logits.shape
    return F.cross_entropy(logits.reshape(n * T, V), y.reshape(n * T), reduction="none").view(n, T)


def _images(batch: int, device: str) -> tuple[Tensor, Tensor]:
    """Random 32×32 RGB images and labels of 10 classes, the same for a seed and device."""
    g = _generator(device)
    x = torch.randn(batch, 3, 32, 32, device=device, generator=g)  # (n, 3, 32, 32)
    return x, torch.randint(0, 10, (batch,), device=device, generator=g)  # (n,)


def _generator(device: str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(1)


def mlp_problem(
    input_size: int = 784,
    hidden_sizes: Sequence[int] = (512, 256),
    num_classes: int = 10,
    batch: int = 256,
    device: str = "cpu",
) -> Problem:
    """An MLP (the seed's 784-512-256-10 by default) on random data, cross-entropy."""
    g = _generator(device)
    x = torch.randn(batch, input_size, device=device, generator=g)
    y = torch.randint(0, num_classes, (batch,), device=device, generator=g)
    sizes = "-".join(str(s) for s in (input_size, *hidden_sizes, num_classes))
    return Problem(
        f"MLP {sizes}, n={batch}",
        lambda: MLP(input_size, list(hidden_sizes), num_classes),
        x,
        y,
        _cross_entropy,
    )


def cnn_problem(batch: int = 64, width: int = 32, device: str = "cpu") -> Problem:
    """The GroupNorm CNN on random 32×32 images."""
    x, y = _images(batch, device)  # (n, 3, 32, 32), (n,)
    return Problem(
        f"GroupNorm CNN w={width}, 32², n={batch}",
        lambda: small_cnn(10, width),
        x,
        y,
        _cross_entropy,
    )


def resnet18_problem(batch: int = 32, device: str = "cpu") -> Problem:
    """torchvision's ResNet-18 with GroupNorm (in-place ReLU, ``out += identity``), 32×32."""
    import torchvision

    def make() -> nn.Module:
        return torchvision.models.resnet18(num_classes=10, norm_layer=lambda c: nn.GroupNorm(32, c))

    x, y = _images(batch, device)  # (n, 3, 32, 32), (n,)
    return Problem(f"ResNet-18 GroupNorm, 32², n={batch}", make, x, y, _cross_entropy)


def gpt_problem(
    batch: int = 16,
    layers: int = 2,
    d: int = 128,
    heads: int = 4,
    T: int = 64,
    vocab: int = 1024,
    device: str = "cpu",
) -> Problem:
    """A GPT-style LM on random tokens, token-level losses (summed per sequence)."""
    g = _generator(device)
    ids = torch.randint(0, vocab, (batch, T + 1), device=device, generator=g)
    return Problem(
        f"GPT {layers}×{d}, T={T}, V={vocab}, n={batch}",
        lambda: GPT(vocab, d, layers, heads, max_len=T),
        ids[:, :-1],
        ids[:, 1:],
        _token_cross_entropy,
    )


def vit_problem(
    batch: int = 32,
    layers: int = 4,
    d: int = 128,
    heads: int = 4,
    device: str = "cpu",
) -> Problem:
    """torchvision's VisionTransformer on 32×32 images in 4×4 patches (65 tokens), no
    dropout: its class token and position embedding are parameters that the model and its
    encoder use directly, and its attention is ``nn.MultiheadAttention``."""
    import torchvision

    def make() -> nn.Module:
        return torchvision.models.VisionTransformer(
            image_size=32,
            patch_size=4,
            num_layers=layers,
            num_heads=heads,
            hidden_dim=d,
            mlp_dim=2 * d,
            num_classes=10,
        )

    x, y = _images(batch, device)  # (n, 3, 32, 32), (n,)
    return Problem(f"ViT {layers}×{d}, 32² in 4² patches, n={batch}", make, x, y, _cross_entropy)


def convnext_problem(
    batch: int = 32,
    widths: tuple[int, ...] = (32, 64, 128),
    device: str = "cpu",
    stochastic_depth: float = 0.1,
) -> Problem:
    """torchvision's ConvNeXt on 32×32 images, two blocks per stage, stochastic depth 0.1
    (training mode draws it): 7×7 depthwise convs, LayerNorm2d, and each block's layer
    scale, a parameter the block uses directly."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    def make() -> nn.Module:
        ends = [*widths[1:], None]
        stages = [CNBlockConfig(w, e, 2) for w, e in zip(widths, ends, strict=True)]
        return ConvNeXt(stages, stochastic_depth_prob=stochastic_depth, num_classes=10)

    x, y = _images(batch, device)  # (n, 3, 32, 32), (n,)
    name = f"ConvNeXt {'-'.join(map(str, widths))} ×2, 32², n={batch}"
    return Problem(name, make, x, y, _cross_entropy)


class RNNClassifier(nn.Module):
    """Token embeddings, a 2-layer ``nn.LSTM`` (or GRU, RNN), a head on the last step."""

    def __init__(self, kind: str, vocab: int, d: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.rnn = getattr(nn, kind)(d, hidden, num_layers=2, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, ids: Tensor) -> Tensor:  # (n, T)
        out, _ = self.rnn(self.embed(ids))  # (n, T, hidden)
        return self.head(out[:, -1])  # (n, classes)


def lstm_problem(
    batch: int = 32, T: int = 32, hidden: int = 128, device: str = "cpu", kind: str = "LSTM"
) -> Problem:
    """A 2-layer LSTM classifier on random tokens (``kind="GRU"`` or ``"RNN"``: the same
    with that layer): its rule computes the gate gradients by hand."""
    g = _generator(device)
    ids = torch.randint(0, 1000, (batch, T), device=device, generator=g)
    y = torch.randint(0, 5, (batch,), device=device, generator=g)
    return Problem(
        f"{kind} 2×{hidden}, T={T}, n={batch}",
        lambda: RNNClassifier(kind, 1000, 64, hidden, 5),
        ids,
        y,
        _cross_entropy,
    )


class Seq2Seq(nn.Module):
    """``nn.Transformer`` between token embeddings and an LM head; its input is the source
    and the target ids side by side, ``(n, S + T)``, the first ``source`` columns the source."""

    def __init__(self, vocab: int, d: int, layers: int, heads: int, source: int, dropout: float):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.transformer = nn.Transformer(
            d, heads, layers, layers, 2 * d, dropout=dropout, batch_first=True
        )
        self.head = nn.Linear(d, vocab)
        self.source = source

    def forward(self, ids: Tensor) -> Tensor:  # (n, S + T)
        src, tgt = self.embed(ids[:, : self.source]), self.embed(ids[:, self.source :])
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1], device=ids.device)
        return self.head(self.transformer(src, tgt, tgt_mask=causal))  # (n, T, vocab)


def seq2seq_problem(
    batch: int = 32,
    layers: int = 2,
    d: int = 128,
    heads: int = 4,
    T: int = 32,
    vocab: int = 1000,
    dropout: float = 0.1,
    device: str = "cpu",
) -> Problem:
    """An encoder-decoder ``nn.Transformer`` (self- and cross-attention, dropout 0.1 in
    training mode) on random source and target tokens, token-level losses."""
    g = _generator(device)
    ids = torch.randint(0, vocab, (batch, 2 * T + 1), device=device, generator=g)
    return Problem(
        f"Transformer {layers}+{layers}×{d}, S=T={T}, V={vocab}, n={batch}",
        lambda: Seq2Seq(vocab, d, layers, heads, T, dropout),
        ids[:, :-1],  # source, then the target's inputs
        ids[:, T + 1 :],  # the target shifted by one
        _token_cross_entropy,
    )


def extras(device: str = "cpu", sizes: str | None = None) -> dict[str, Callable[[], Problem]]:
    """Problems beside the zoo, run when named (``indigrad bench --problems vit,convnext,lstm``)."""
    if (sizes or device) == "cpu":
        return {
            "vit": lambda: vit_problem(batch=32, device=device),
            "convnext": lambda: convnext_problem(batch=32, device=device),
            "lstm": lambda: lstm_problem(device=device),
            "gru": lambda: lstm_problem(device=device, kind="GRU"),
            "rnn": lambda: lstm_problem(device=device, kind="RNN"),
            "seq2seq": lambda: seq2seq_problem(device=device),
        }
    return {
        "vit": lambda: vit_problem(256, 6, 384, 6, device=device),
        "convnext": lambda: convnext_problem(256, (64, 128, 256), device=device),
        "lstm": lambda: lstm_problem(256, 64, 512, device=device),
        "gru": lambda: lstm_problem(256, 64, 512, device=device, kind="GRU"),
        "rnn": lambda: lstm_problem(256, 64, 512, device=device, kind="RNN"),
        "seq2seq": lambda: seq2seq_problem(256, 6, 512, 8, 128, 8192, device=device),
    }


def zoo(device: str = "cpu", sizes: str | None = None) -> dict[str, Callable[[], Problem]]:
    """The benchmark problems on ``device``, sized for a 2-core CPU or for a GPU (by
    ``device``, or by ``sizes``: ``"cpu"`` or another device's)."""
    if (sizes or device) == "cpu":
        return {
            "mlp": lambda: mlp_problem(batch=256, device=device),
            "wide-mlp": lambda: mlp_problem(1024, (4096, 4096), 10, batch=16, device=device),
            "cnn": lambda: cnn_problem(batch=64, device=device),
            "resnet18": lambda: resnet18_problem(batch=16, device=device),
            "gpt": lambda: gpt_problem(batch=16, device=device),
        }
    return {
        "mlp": lambda: mlp_problem(batch=256, device=device),
        "wide-mlp": lambda: mlp_problem(1024, (4096, 4096), 10, batch=128, device=device),
        "cnn": lambda: cnn_problem(batch=256, device=device),
        "resnet18": lambda: resnet18_problem(batch=256, device=device),
        "gpt": lambda: gpt_problem(32, 8, 512, 8, 256, 8192, device=device),
    }


def by_name(name: str, device: str = "cpu") -> Problem:
    """The problem of the zoo or of the extras called ``name``, on ``device``.

    Example:
        >>> by_name("mlp").name
        'MLP 784-512-256-10, n=256'
    """
    available = {**zoo(device), **extras(device)}
    if name not in available:
        raise ValueError(f"unknown problem {name!r}; choose from {list(available)}")
    return available[name]()


def parameters(problem: Problem) -> int:
    """The number of trainable parameters of the problem's model."""
    return sum(math.prod(p.shape) for p in problem.model().parameters() if p.requires_grad)
