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

import _lm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from indigrad import bench


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
    parser = _lm.parser(__doc__, d=256, vocab=8192, repeats=10)
    args = parser.parse_args()
    _lm.run(problem(args.vocab, args.d, args.T, args.n, args.device), args.rss, args.repeats)


if __name__ == "__main__":
    main()
