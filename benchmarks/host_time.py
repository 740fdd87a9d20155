"""Host time of a step: the zoo's GPT with tiny tensors, so that its kernels cost next to
nothing and what is timed is the host's work — Python, dispatch, autograd's bookkeeping.

That is what bounds a small model's step on a GPU; on a CPU it is a share of every step
(a few ms of the CPU GPT's clipped step). Ratios to the plain step, medians of
round-robin rounds, one thread.

    python benchmarks/host_time.py
    python benchmarks/host_time.py --layers 8 --rounds 500
"""

from __future__ import annotations

import argparse

import torch

from indigrad import bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--methods", default="plain,norms,clipped,grads")
    args = parser.parse_args()
    torch.set_num_threads(1)
    problem = bench.gpt_problem(batch=2, layers=args.layers, d=8, heads=2, T=4, vocab=16)
    methods = list(dict.fromkeys(["plain", *args.methods.split(",")]))  # plain always shown
    results = bench.run(problem, methods, repeats=args.rounds, warmup=10)
    print(bench.table(problem, results) + "\n(one thread)")


if __name__ == "__main__":
    main()
