"""The host's time per phase of a clipped step and of a plain one, with the operators
each phase dispatches.

On a GPU the step is synchronised only at its end, so each phase's time is the host's
(``finish`` is what it then waits for the device: about zero where the host sets the
pace). Medians of ``--rounds`` steps, the two methods alternated.

    python benchmarks/step_phases.py --device cuda                # the zoo's ResNet-18
    python benchmarks/step_phases.py --problem gpt
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

import indigrad
from indigrad import bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problem", default="resnet18")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    problem = bench.by_name(args.problem, args.device)
    model, x, y, loss = problem.model(), problem.x, problem.y, problem.loss
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, foreach=args.device != "cpu")
    cuda = torch.device(args.device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times: dict[str, list[float]] = {}

    def lap(name: str, start: float) -> float:
        now = time.perf_counter()
        times.setdefault(name, []).append(now - start)
        return now

    def clipped() -> None:
        sync()
        t = time.perf_counter()
        with indigrad.capture(model) as cap:
            t = lap("clipped: enter", t)
            out = model(x)
            t = lap("clipped: forward", t)
            per_example = cap.backward(loss(out, y))
            t = lap("clipped: backward", t)
            per_example._norms(clipping=True, release=True)
            t = lap("clipped: norms", t)
            per_example._clip(1.0, release=True)
            t = lap("clipped: sums", t)
        finish("clipped", t)

    def plain() -> None:
        sync()
        t = time.perf_counter()
        out = model(x)
        t = lap("plain: forward", t)
        loss(out, y).sum().backward()
        t = lap("plain: backward", t)
        finish("plain", t)

    def finish(method: str, t: float) -> None:
        """The optimizer step, then the wait for the device."""
        opt.step()
        opt.zero_grad(set_to_none=True)
        t = lap(f"{method}: step", t)
        sync()
        lap(f"{method}: finish", t)

    for _ in range(5):
        clipped(), plain()
    times.clear()
    for _ in range(args.rounds):
        clipped(), plain()
    got: dict[str, Any] = {}  # what a counted phase hands to the next

    def forward() -> None:
        got["out"] = model(x)

    def backward() -> None:
        got["per_example"] = cap.backward(loss(got["out"], y))

    def norms() -> None:
        got["per_example"]._norms(clipping=True, release=True)

    def sums() -> None:
        got["per_example"]._clip(1.0, release=True)

    with indigrad.capture(model) as cap:  # the operators of each phase (bench.count_ops)
        phases = {"forward": forward, "backward": backward, "norms": norms, "sums": sums}
        ops = {f"clipped: {k}": bench.count_ops(phase) for k, phase in phases.items()}
    opt.zero_grad(set_to_none=True)
    print(f"{problem.name}, torch {torch.__version__}, host ms per phase ({args.rounds} rounds)")
    total = {"clipped": 0.0, "plain": 0.0}
    for name, values in times.items():
        ms = statistics.median(values) * 1e3
        total[name.split(":")[0]] += ms
        counted = ops.get(name)
        extra = ""
        if counted is not None:
            all_, views = counted["all"], counted["views"]
            extra = f"   {all_:4d} operators, {all_ - views} not views"
        print(f"  {name:<20} {ms:8.3f}{extra}")
    print(f"  clipped / plain: {total['clipped'] / total['plain']:.2f}")


if __name__ == "__main__":
    main()
