"""Whether two host threads issue a step's rule operators faster than one.

PyTorch releases the GIL while it dispatches an operator, so two threads could overlap
that part of the host's work. This takes ResNet-18's recorded calls from one backward
and times their rules' norms (GroupNorm's gradients) issued by one thread, then split
between two on the same CUDA stream, alternated, medians of 25 rounds.

    python benchmarks/host_threads.py --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import threading
from typing import Any

import torch
from _rounds import interleaved

import indigrad
from indigrad import bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=25)
    args = parser.parse_args()
    problem = bench.zoo(args.device)["resnet18"]()
    model = problem.model()
    with indigrad.capture(model) as cap:
        per_example = cap.backward(problem.loss(model(problem.x), problem.y))
    entries = [e for e in per_example._entries if e.rule is not None]
    cuda = torch.device(args.device).type == "cuda"
    stream = torch.cuda.current_stream() if cuda else None

    def norms(part: list[Any]) -> None:
        on_stream = torch.cuda.stream(stream) if cuda else contextlib.nullcontext()
        with torch.no_grad(), on_stream:  # a thread's own grad mode and stream
            for e in part:
                rule, module = e.rule, e.call.module
                if rule.sq_norms is not None:
                    rule.sq_norms(module, e.inputs, e.G)
                else:
                    rule.grads(module, e.inputs, e.G)

    def two_threads() -> None:
        other = threading.Thread(target=norms, args=(entries[1::2],))
        other.start()
        norms(entries[0::2])
        other.join()

    steps = {"one thread": lambda: norms(entries), "two threads": two_threads}
    medians = interleaved(steps, args.rounds, warmup=2, cuda=cuda)
    print(f"{problem.name}: the norms of {len(entries)} calls, torch {torch.__version__}")
    for name, seconds in medians.items():
        print(f"  {name:<12} {seconds * 1e3:7.2f} ms")


if __name__ == "__main__":
    main()
