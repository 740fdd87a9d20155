"""Whether the rules' norms, taken while the backward still runs, make a step faster.

The backward of a capture asks autograd for every recorded call's output gradient and
takes the norms once all have come. Each gradient is complete earlier: when the
backward reaches the call's autograd node, whose pre-hook receives it. Here the backward
runs in a second thread (one kept from round to round: starting a thread per step costs
more) and this one takes each call's norms as its gradient arrives, so that the host's
two parts of the step, autograd's operators and the rules', could overlap. Against
that: the backward, then the norms, in one thread. The calls are ResNet-18's convs and
GroupNorms, their rules' ``sq_norms`` (GroupNorm's ``grads``) on the recorded inputs;
the forward and the backward are timed with them. Medians of interleaved rounds.

    python benchmarks/overlap_backward.py --as cuda     # host_time.py's tiny ResNet-18
    python benchmarks/overlap_backward.py --device cuda # the zoo's ResNet-18, n = 256
"""

from __future__ import annotations

import argparse
import queue
import threading
from collections.abc import Callable
from typing import Any

import torch
from _rounds import interleaved
from torch import nn
from torch.autograd.graph import GradientEdge

import indigrad
from indigrad import bench


class Recorded:
    """The convs' and GroupNorms' calls of one forward: module, rule, input, node."""

    def __init__(self, model: nn.Module) -> None:
        self.calls: list[tuple[nn.Module, Any, torch.Tensor, Any]] = []
        for module in model.modules():
            if isinstance(module, nn.Conv2d | nn.GroupNorm):
                module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        self.calls.append((module, indigrad.lookup_rule(module), args[0], output.grad_fn))


def norm_of(call: tuple[nn.Module, Any, torch.Tensor, Any], G: torch.Tensor) -> Any:
    module, rule, x, _ = call
    with torch.no_grad():
        if rule.sq_norms is not None:
            return rule.sq_norms(module, (x,), G)
        return rule.grads(module, (x,), G)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--as", dest="act_as", help="take this device's cost settings")
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    if args.act_as:
        from host_ops import act_as

        act_as(args.act_as)
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        problem = bench.zoo(args.device)["resnet18"]()
    else:
        from host_time import tiny_problem

        torch.set_num_threads(1)
        problem = tiny_problem()
    model, x, y = problem.model(), problem.x, problem.y
    recorded = Recorded(model)

    def forward() -> tuple[torch.Tensor, list[GradientEdge]]:
        recorded.calls.clear()
        losses = problem.loss(model(x), y)  # (n,)
        return losses, [GradientEdge(node, 0) for *_, node in recorded.calls]

    def one_thread() -> list[Any]:
        losses, edges = forward()
        grads = torch.autograd.grad(losses.sum(), edges)
        return [norm_of(call, G) for call, G in zip(recorded.calls, grads, strict=True)]

    jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()

    def serve() -> None:
        while True:
            jobs.get()()

    threading.Thread(target=serve, daemon=True).start()

    def overlapped() -> list[Any]:
        losses, edges = forward()
        arrived: queue.SimpleQueue[tuple[int, torch.Tensor] | None] = queue.SimpleQueue()
        for i, (*_, node) in enumerate(recorded.calls):
            node.register_prehook(lambda grads, i=i: arrived.put((i, grads[0])))
        result: dict[str, Any] = {}

        def backward() -> None:
            try:
                result["grads"] = torch.autograd.grad(losses.sum(), edges)
            except BaseException as e:  # re-raised in this thread
                result["error"] = e
            arrived.put(None)

        jobs.put(backward)
        out: list[Any] = [None] * len(edges)
        while (item := arrived.get()) is not None:
            i, G = item
            out[i] = norm_of(recorded.calls[i], G)
        if "error" in result:
            raise result["error"]
        for i, G in enumerate(result["grads"]):  # nodes the backward did not run (the first)
            if out[i] is None:
                out[i] = norm_of(recorded.calls[i], G)
        return out

    for a, b in zip(one_thread(), overlapped(), strict=True):  # the same norms either way
        for k in a:
            torch.testing.assert_close(a[k], b[k])
    steps = {"backward, then norms": one_thread, "overlapped": overlapped}
    medians = interleaved(steps, args.rounds, cuda=cuda, alternate=True)
    calls = len(recorded.calls)
    print(f"{problem.name}: {calls} calls, torch {torch.__version__}, {args.rounds} rounds")
    for label, seconds in medians.items():
        print(f"  {label:<22} {seconds * 1e3:7.2f} ms")


if __name__ == "__main__":
    main()
