"""How close an MLP's ``grads`` step is to its floor: the library's step against a
minimal loop of forward hooks and the same outer products, taken after the backward or
launched from a hook on each layer's output gradient as the backward produces it.

The wide MLP's per-example gradients are 10.8 GB a step, written at the memory's speed
by ``indigrad/_outer.py``'s kernel on a GPU; this says how much of the step is that and
how much the capture's own work.

    python benchmarks/grads_floor.py --device cuda          # the zoo's wide MLP, n = 128
    python benchmarks/grads_floor.py --device cpu           # a small MLP, for a try
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from _rounds import interleaved
from torch import Tensor, nn

from indigrad import _outer, bench
from indigrad.bench.methods import METHODS


def outer(G: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
    """One Linear's per-example weight and bias gradients from its (n, out) output
    gradient and (n, in) input."""
    W = G.new_empty(G.shape[0], G.shape[1], A.shape[1])  # (n, out, in)
    if not _outer.outer(G, A, W):
        torch.mul(G[:, :, None], A[:, None, :], out=W)
    return W, G


def minimal(problem: bench.Problem, model: nn.Module, during: bool) -> dict[int, Any]:
    """The Linears' per-example gradients by forward hooks and the output gradients alone
    (``autograd.grad`` to the outputs: no weight gradients), ``during`` the backward or
    after it."""
    inputs: list[Tensor] = []
    outputs: list[Tensor] = []
    result: dict[int, Any] = {}

    def record(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
        A = args[0].detach()  # (n, in)
        inputs.append(A)
        outputs.append(out)
        if during:
            k = len(outputs) - 1

            def launch(G: Tensor) -> None:
                result[k] = outer(G, A)

            out.register_hook(launch)

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    handles = [m.register_forward_hook(record) for m in linears]
    try:
        loss = problem.loss(model(problem.x), problem.y).sum()
    finally:
        for h in handles:
            h.remove()
    grads = torch.autograd.grad(loss, outputs)  # (n, out) each
    if not during:
        for k, (G, A) in enumerate(zip(grads, inputs, strict=True)):
            result[k] = outer(G, A)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    if cuda:
        problem = bench.zoo(args.device)["wide-mlp"]()
    else:
        problem = bench.mlp_problem(256, [512, 512], 10, batch=16, device=args.device)
    model = problem.model()
    after, during = minimal(problem, model, False), minimal(problem, model, True)
    assert all(torch.equal(after[k][0], during[k][0]) for k in after)
    steps = {
        "plain": METHODS["plain"](problem),
        "hooks, after the backward": lambda: minimal(problem, model, False),
        "hooks, during the backward": lambda: minimal(problem, model, True),
        "indigrad grads": METHODS["grads"](problem),
    }
    t = interleaved(steps, rounds=args.rounds, cuda=cuda, alternate=True)
    print(f"{problem.name}, torch {torch.__version__}, {args.rounds} interleaved rounds")
    for name, seconds in t.items():
        print(f"  {name:<28} {seconds * 1e3:8.2f} ms  {seconds / t['plain']:.2f}× plain")


if __name__ == "__main__":
    main()
