"""What TF32 does to the steps' ratios: plain, ``norms`` and the clipped step with float32
matrix products in full precision and in TF32, alternated within one process.

Under TF32 the ghost norms take their Grams in float64 (``indigrad/rules/_ghost.py``), so
a model whose plain step gains much from TF32 sees its ratios grow.

    python benchmarks/tf32_cost.py --device cuda                  # ResNet-18 and the GPT
    python benchmarks/tf32_cost.py --device cuda --problems gpt --rounds 30
"""

from __future__ import annotations

import argparse

import torch
from _rounds import interleaved

from indigrad import bench
from indigrad.bench.methods import METHODS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", default="resnet18,gpt")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    saved = torch.backends.cuda.matmul.allow_tf32
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if cuda else 'cpu'}")
    try:
        for key in args.problems.split(","):
            problem = bench.zoo(args.device)[key]()
            for tf32 in (False, True):
                torch.backends.cuda.matmul.allow_tf32 = tf32
                steps = {m: METHODS[m](problem) for m in ("plain", "norms", "clipped")}
                t = interleaved(steps, rounds=args.rounds, cuda=cuda, alternate=True)
                print(
                    f"{problem.name}, TF32 {'on' if tf32 else 'off'}: plain "
                    f"{t['plain'] * 1e3:.2f} ms, norms {t['norms'] / t['plain']:.2f}×, "
                    f"clipped {t['clipped'] / t['plain']:.2f}×",
                    flush=True,
                )
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


if __name__ == "__main__":
    main()
