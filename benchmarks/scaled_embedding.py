"""A language model whose token embedding has a forward of its own, ``embedding(ids) *
scale`` (Hugging Face's scaled word embeddings: BART, Gemma): indigrad's methods against a
plain step, as ``indigrad bench`` times them.

The table is read from the graph as an ``F.embedding`` lookup and takes the
``nn.Embedding`` rule's norms and sums (``indigrad/rules/direct.py``), not the generic
rule's ``(n, V, d)`` per-example tables. ``--rss`` instead runs clipped steps only and
prints how far they raised the process's peak resident memory over the model's (CPU), to
compare with a checkout that sent the embedding to the generic rule.

    python benchmarks/scaled_embedding.py
    python benchmarks/scaled_embedding.py --vocab 32768 --rss
"""

from __future__ import annotations

import argparse
import resource

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from indigrad import bench
from indigrad.bench.methods import METHODS


class ScaledEmbedding(nn.Embedding):
    def __init__(self, vocab: int, d: int) -> None:
        super().__init__(vocab, d)
        self.scale = d**0.5

    def forward(self, ids: Tensor) -> Tensor:
        return super().forward(ids) * self.scale


class LM(nn.Module):
    """The scaled embedding, one tanh layer, an LM head."""

    def __init__(self, vocab: int, d: int) -> None:
        super().__init__()
        self.embed = ScaledEmbedding(vocab, d)
        self.fc = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: Tensor) -> Tensor:  # (n, T)
        return self.head(torch.tanh(self.fc(self.embed(ids))))  # (n, T, V)


def problem(vocab: int, d: int, T: int, n: int, device: str) -> bench.Problem:
    def loss(logits: Tensor, y: Tensor) -> Tensor:  # (n, T, V), (n, T) -> (n, T)
        flat = F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1), reduction="none")
        return flat.view(y.shape)

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (n, T + 1), generator=g).to(device)
    name = f"scaled embedding LM d={d}, T={T}, V={vocab}, n={n}"
    return bench.Problem(name, lambda: LM(vocab, d), ids[:, :-1], ids[:, 1:], loss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--T", type=int, default=64)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rss", action="store_true", help="peak memory of clipped steps")
    args = parser.parse_args()
    p = problem(args.vocab, args.d, args.T, args.n, args.device)
    if args.rss:
        step = METHODS["clipped"](p)  # builds the model: its memory is the baseline
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        for _ in range(3):
            step()
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
        print(f"{p.name}: 3 clipped steps raised the peak resident memory by {grown // 1024} MiB")
        return
    results = bench.run(p, ["plain", "norms", "clipped", "grads"], repeats=args.repeats)
    print(bench.table(p, results))


if __name__ == "__main__":
    main()
