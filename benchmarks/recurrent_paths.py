"""What two of the recurrent layers' paths save: the recurrent classifiers' steps with
one path switched off and on alternately in one process, as ratios to the plain step.

    --switch split    the backward split at the layer (``indigrad/_split.py``); off, the
                      capture's backward is one ``autograd.grad`` that runs the layer's own
                      backward to reach the embedding below it
    --switch output   the top layer's states read from the call's output (``Rule.output``);
                      off, the top layer is run again
    --switch graph    the states of the layers below the top read from the graph
                      (``recurrent.rnn_inner``); off, those layers are run again

Rounds alternate which comes first; the first three warm up.

    python benchmarks/recurrent_paths.py                          # split; LSTM, GRU, RNN
    python benchmarks/recurrent_paths.py --switch output --kinds GRU,RNN --rounds 20
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from indigrad import _split, bench
from indigrad.bench.methods import METHODS
from indigrad.rules import recurrent

QUANTITIES = ("norms", "clipped", "grads")


def _switches(name: str) -> tuple[Callable[[bool], None], Callable[[], None]]:
    """``set(on)`` for the named path, and ``restore()``."""
    if name == "split":
        plan = _split.plan

        def set_split(on: bool) -> None:
            _split.plan = plan if on else (lambda *a: [])

        return set_split, lambda: setattr(_split, "plan", plan)
    by_hand = recurrent._by_hand

    def without(
        rnn: Any, inputs: Any, G: Any, states: Any, input_grad: bool = False, output: Any = None
    ) -> Any:
        if name == "output":
            return by_hand(rnn, inputs, G, states, input_grad)  # the top layer run again
        return by_hand(rnn, inputs, G, {}, input_grad, output)  # the layers below run again

    def set_path(on: bool) -> None:
        setattr(recurrent, "_by_hand", by_hand if on else without)  # noqa: B010

    return set_path, lambda: setattr(recurrent, "_by_hand", by_hand)


def compare(problem: bench.Problem, switch: str, rounds: int) -> dict[str, tuple[float, float]]:
    """Each quantity's step with the path ``switch`` off and on, as ratios to the plain
    step: ``{method: (off, on)}``, and ``"plain"``: its milliseconds (twice)."""
    set_path, restore = _switches(switch)
    cuda = problem.x.device.type == "cuda"
    try:
        steps = {m: METHODS[m](problem) for m in ("plain", *QUANTITIES)}
        times: dict[tuple[str, bool], list[float]] = {}
        for r in range(rounds + 3):  # the first three rounds warm up
            for on in (True, False) if r % 2 else (False, True):
                set_path(on)
                for method, step in steps.items():
                    if method == "plain" and not on:
                        continue
                    start = time.perf_counter()
                    step()
                    if cuda:
                        torch.cuda.synchronize()
                    if r >= 3:
                        elapsed = (time.perf_counter() - start) * 1e3
                        times.setdefault((method, on), []).append(elapsed)
    finally:
        restore()
    base = statistics.median(times["plain", True])
    out = {"plain": (base, base)}
    for method in QUANTITIES:
        off, on_ = (statistics.median(times[method, s]) / base for s in (False, True))
        out[method] = (off, on_)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--switch", choices=["split", "output", "graph"], default="split")
    parser.add_argument("--kinds", default="LSTM,GRU,RNN")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    for kind in args.kinds.split(","):
        problem = bench.lstm_problem(kind=kind)
        result = compare(problem, args.switch, args.rounds)
        print(f"{problem.name}: plain {result['plain'][0]:.1f} ms; × plain, {args.switch} off → on")
        for method in QUANTITIES:
            print(f"  {method:<8} {result[method][0]:.2f}× → {result[method][1]:.2f}×")


if __name__ == "__main__":
    main()
