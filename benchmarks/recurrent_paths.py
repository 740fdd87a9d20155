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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--switch", choices=["split", "output", "graph"], default="split")
    parser.add_argument("--kinds", default="LSTM,GRU,RNN")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    switch, restore = _switches(args.switch)
    try:
        for kind in args.kinds.split(","):
            problem = bench.lstm_problem(kind=kind)
            steps = {m: METHODS[m](problem) for m in ("plain", *QUANTITIES)}
            times: dict[tuple[str, bool], list[float]] = {}
            for r in range(args.rounds + 3):
                for on in (True, False) if r % 2 else (False, True):
                    switch(on)
                    for method, step in steps.items():
                        if method == "plain" and not on:
                            continue
                        start = time.perf_counter()
                        step()
                        if r >= 3:
                            elapsed = (time.perf_counter() - start) * 1e3
                            times.setdefault((method, on), []).append(elapsed)
            base = statistics.median(times["plain", True])
            print(f"{problem.name}: plain {base:.1f} ms; × plain, {args.switch} off → on")
            for method in QUANTITIES:
                off, on_ = (statistics.median(times[method, s]) / base for s in (False, True))
                print(f"  {method:<8} {off:.2f}× → {on_:.2f}×")
    finally:
        restore()


if __name__ == "__main__":
    main()
