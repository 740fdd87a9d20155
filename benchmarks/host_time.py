"""Host time of a step: a zoo model's structure with tiny tensors, so that its kernels cost
next to nothing and what is timed is the host's work — Python, dispatch, autograd's
bookkeeping.

That is what bounds a small model's step on a GPU; on a CPU it is a share of every step
(a few ms of the CPU GPT's clipped step). Ratios to the plain step, medians of
round-robin rounds, one thread.

    python benchmarks/host_time.py                          # the GPT, 2 layers
    python benchmarks/host_time.py --layers 8 --rounds 500
    python benchmarks/host_time.py --model resnet18 --as cuda   # needs torchvision

``--model resnet18`` is ResNet-18's structure (GroupNorm, torchvision's BasicBlock) at
widths 4–32 on 8×8 images, n = 2; ``--as cuda`` makes the rules take the choices they
make on a GPU (``host_ops.act_as``), and the SGD step is the GPU's ``foreach`` one.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from indigrad import bench
from indigrad.bench import methods as M
from indigrad.bench.problems import _cross_entropy


def tiny_resnet18() -> nn.Module:
    """ResNet-18's layers (a 7×7 stem, max-pool, four stages of two BasicBlocks, GroupNorm
    throughout) at widths 4, 8, 16, 32."""
    from torchvision.models.resnet import BasicBlock

    def norm(c: int) -> nn.Module:
        return nn.GroupNorm(2, c)

    widths = [4, 8, 16, 32]
    layers: list[nn.Module] = [
        nn.Conv2d(3, widths[0], 7, 2, 3, bias=False),
        norm(widths[0]),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
    ]
    c_in = widths[0]
    for i, c in enumerate(widths):
        stride = 1 if i == 0 else 2
        down = None
        if stride != 1 or c_in != c:
            down = nn.Sequential(nn.Conv2d(c_in, c, 1, stride, bias=False), norm(c))
        layers += [
            BasicBlock(c_in, c, stride, down, norm_layer=norm),
            BasicBlock(c, c, norm_layer=norm),
        ]
        c_in = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, 10)]
    return nn.Sequential(*layers)


def tiny_problem() -> bench.Problem:
    """:func:`tiny_resnet18` on two random 8×8 images of 10 classes (also the tiny model
    of ``against.py --tiny`` and ``overlap_backward.py``)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 8, generator=g)  # (n, 3, 8, 8)
    y = torch.randint(0, 10, (2,), generator=g)  # (n,)
    name = "tiny ResNet-18, widths 4-32, 8², n=2"
    return bench.Problem(name, tiny_resnet18, x, y, _cross_entropy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["gpt", "resnet18"], default="gpt")
    parser.add_argument("--layers", type=int, default=2, help="the GPT's layers")
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--methods", default="plain,norms,clipped,grads")
    parser.add_argument("--as", dest="device", help="take this device's cost choices")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.device:
        from host_ops import act_as

        act_as(args.device)
        if args.device != "cpu":  # the GPU's optimizer step: a few foreach operators
            M._sgd = lambda model: torch.optim.SGD(
                [p for p in model.parameters() if p.requires_grad], lr=1e-3, foreach=True
            )
    if args.model == "gpt":
        problem = bench.gpt_problem(batch=2, layers=args.layers, d=8, heads=2, T=4, vocab=16)
    else:
        problem = tiny_problem()
    methods = list(dict.fromkeys(["plain", *args.methods.split(",")]))  # plain always shown
    results = bench.run(problem, methods, repeats=args.rounds, warmup=10)
    print(bench.table(problem, results) + "\n(one thread)")


if __name__ == "__main__":
    main()
