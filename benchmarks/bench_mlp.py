"""Plain training vs indigrad (grads, norms, clipped step) vs a per-example loop vs
torch.func on the seed MLP 784-512-256-10, batch 256, in one process.

    python benchmarks/bench_mlp.py [--repeats 50] [--json results.json] [--device cuda]

The same as `indigrad bench`; every option of that command is accepted.
"""

import sys

from indigrad.cli import main

if __name__ == "__main__":
    main(["bench", *sys.argv[1:]])
