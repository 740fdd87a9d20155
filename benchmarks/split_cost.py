"""What splitting the backward at recurrent layers saves (``indigrad/_split.py``): the
recurrent classifiers' steps with the split switched off and on alternately in one
process, as ratios to the plain step.

"Off" plans no cuts, so the capture's backward is one ``autograd.grad`` that runs the
recurrent layer's own backward to reach the embedding below it. Rounds alternate which
comes first.

    python benchmarks/split_cost.py                        # LSTM, GRU, RNN; 15 rounds
    python benchmarks/split_cost.py --kinds GRU --rounds 40
"""

from __future__ import annotations

import argparse
import statistics
import time

from indigrad import _split, bench
from indigrad.bench.methods import METHODS

QUANTITIES = ("norms", "clipped", "grads")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kinds", default="LSTM,GRU,RNN")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    plan = _split.plan
    try:
        for kind in args.kinds.split(","):
            problem = bench.lstm_problem(kind=kind)
            steps = {m: METHODS[m](problem) for m in ("plain", *QUANTITIES)}
            times: dict[tuple[str, bool], list[float]] = {}
            for r in range(args.rounds + 3):  # the first three rounds warm up
                for split in (True, False) if r % 2 else (False, True):
                    _split.plan = plan if split else (lambda *a: [])
                    for method, step in steps.items():
                        if method == "plain" and not split:
                            continue
                        start = time.perf_counter()
                        step()
                        if r >= 3:
                            elapsed = (time.perf_counter() - start) * 1e3
                            times.setdefault((method, split), []).append(elapsed)
            base = statistics.median(times["plain", True])
            print(f"{problem.name}: plain {base:.1f} ms, × plain (one backward → split)")
            for method in QUANTITIES:
                off, on = (statistics.median(times[method, s]) / base for s in (False, True))
                print(f"  {method:<8} {off:.2f}× → {on:.2f}×")
    finally:
        _split.plan = plan


if __name__ == "__main__":
    main()
