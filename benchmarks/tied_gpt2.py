"""Hugging Face's GPT-2 (token embedding tied to the LM head), built from a config without
weights: indigrad's methods against a plain step, as ``indigrad bench`` times them.

The shared (V, d) weight takes its norms from the Grams of its two uses
(``indigrad/rules/tied.py``). On CUDA the table has each method's peak memory over
plain's. ``--rss`` instead runs clipped steps only and prints how far they raised the
process's peak resident memory over the model's (CPU), to compare with a checkout whose
per-example (V, d) gradients were materialised.

    python benchmarks/tied_gpt2.py
    python benchmarks/tied_gpt2.py --vocab 16384 --d 256 --rss
    python benchmarks/tied_gpt2.py --device cuda --layers 8 --d 512 --vocab 8192 --T 256 --n 32
"""

from __future__ import annotations

import _lm
import torch
import torch.nn.functional as F
from torch import Tensor

from indigrad import bench


def problem(layers: int, d: int, vocab: int, T: int, n: int, device: str) -> bench.Problem:
    import transformers

    config = transformers.GPT2Config(
        vocab_size=vocab,
        n_positions=T,
        n_embd=d,
        n_layer=layers,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )

    def loss(logits: Tensor, y: Tensor) -> Tensor:  # (n, T, V), (n, T) -> (n, T)
        flat = F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1), reduction="none")
        return flat.view(y.shape)

    class LM(transformers.GPT2LMHeadModel):
        def forward(self, ids: Tensor) -> Tensor:  # type: ignore[override]
            return super().forward(input_ids=ids).logits

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (n, T + 1), generator=g).to(device)
    name = f"GPT-2 tied {layers}×{d}, T={T}, V={vocab}, n={n}"
    return bench.Problem(name, lambda: LM(config), ids[:, :-1], ids[:, 1:], loss)


def main() -> None:
    parser = _lm.parser(__doc__, d=128, vocab=1024, repeats=30)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    _lm.run(
        problem(args.layers, args.d, args.vocab, args.T, args.n, args.device),
        args.rss,
        args.repeats,
    )


if __name__ == "__main__":
    main()
