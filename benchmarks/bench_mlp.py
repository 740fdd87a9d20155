"""Plain training vs indigrad (grads, norms, clipped step) vs a per-example loop vs
torch.func on the seed MLP 784-512-256-10, batch 256, in one process.

    python benchmarks/bench_mlp.py [--repeats 50] [--json results.json] [--device cuda]

The same as `indigrad bench --problems mlp --methods plain,grads,norms,clipped,torch.func,loop`;
every option of that command is accepted. `indigrad bench` alone runs the whole zoo
(MLPs, GroupNorm CNN, ResNet-18, GPT-style LM) against the peer libraries.
"""

import sys

from indigrad.cli import main

if __name__ == "__main__":
    defaults = ["--problems", "mlp", "--methods", "plain,grads,norms,clipped,torch.func,loop"]
    main(["bench", *defaults, *sys.argv[1:]])
