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

import argparse
import resource

import torch
import torch.nn.functional as F
from torch import Tensor

from indigrad import bench
from indigrad.bench.methods import METHODS


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
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--T", type=int, default=64)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rss", action="store_true", help="peak memory of clipped steps")
    args = parser.parse_args()
    p = problem(args.layers, args.d, args.vocab, args.T, args.n, args.device)
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
