"""How much of the norms and clipped sums is Python: the same step's operators replayed
from a recorded graph, against the quantities computed as usual.

The quantities of one step (``_norms`` and ``_clip`` of a :class:`PerExample`) are traced
once with ``make_fx``, every tensor they read taken as a constant, and the resulting graph
of ATen operators is replayed on those same tensors: the operators without indigrad's
Python between them (rule lookups, cost choices, stacking plans, shape checks, dicts). The
eager figure is the median over fresh steps, the replay's over repeated calls on one step's
tensors (warmer caches: a bound, not a forecast). A measurement only; indigrad replays
nothing.

    python benchmarks/replay_bound.py --problem gpt
    python benchmarks/replay_bound.py --tiny --as cuda     # host_time.py's tiny ResNet-18
    python benchmarks/replay_bound.py --problem resnet18 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from _rounds import interleaved
from torch.fx.experimental.proxy_tensor import make_fx

import indigrad
from indigrad import bench


def bound(problem: bench.Problem, rounds: int) -> dict[str, Any]:
    """The eager quantities' and their replay's median ms, and plain's forward and
    backward, on ``problem``'s device (synchronised before and after each call)."""
    model, x, y, loss = problem.make_model(), problem.x, problem.y, problem.loss
    params = list(model.parameters())
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)

    def backward() -> tuple[Any, Any]:
        cap = indigrad.capture(model)
        cap.__enter__()
        return cap, cap.backward(loss(model(x), y))

    def quantities(per_example: Any) -> list[Any]:
        norms = per_example._norms(clipping=True, release=False)
        per_example._clip(1.0, release=False)
        return [norms, *(p.grad for p in params)]

    def finish(cap: Any) -> None:
        cap.__exit__(None, None, None)
        for p in params:
            p.grad = None

    eager: list[float] = []
    for i in range(rounds + 3):
        cap, per_example = backward()
        sync()
        start = time.perf_counter()
        quantities(per_example)
        sync()
        if i >= 3:
            eager.append(time.perf_counter() - start)
        finish(cap)
    cap, per_example = backward()
    with torch.no_grad():
        graph = make_fx(lambda: quantities(per_example))()
    finish(cap)

    def replay() -> None:
        with torch.no_grad():
            graph()

    def plain() -> None:
        loss(model(x), y).sum().backward()
        for p in params:
            p.grad = None

    timed = interleaved({"replay": replay, "plain": plain}, rounds, cuda=x.device.type == "cuda")
    return {
        "operators": sum(node.op == "call_function" for node in graph.graph.nodes),
        "eager_ms": statistics.median(eager) * 1e3,
        "replayed_ms": timed["replay"] * 1e3,
        "plain_ms": timed["plain"] * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problem", default="gpt")
    parser.add_argument("--tiny", action="store_true", help="host_time.py's tiny ResNet-18")
    parser.add_argument("--as", dest="act_as", help="take this device's cost settings")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    if args.act_as:
        from host_ops import act_as

        act_as(args.act_as)
    if args.tiny:
        from host_time import tiny_problem

        torch.set_num_threads(1)
        problem = tiny_problem()
    else:
        problem = bench.by_name(args.problem, args.device)
    r = bound(problem, args.rounds)
    print(f"{problem.name}: {r['operators']} operators")
    print(f"  norms and clipped sums, eager   {r['eager_ms']:8.3f} ms")
    print(f"  the same operators, replayed    {r['replayed_ms']:8.3f} ms")
    print(f"  plain forward and backward      {r['plain_ms']:8.3f} ms")


if __name__ == "__main__":
    main()
