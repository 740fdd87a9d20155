"""Calibrate the CPU's cost of one pass over a kept per-example gradient (``_PASS_COST`` in
``indigrad/rules/_cost.py``): the clipped step of a zoo problem under several values, one
step each per round, interleaved with the plain step, as ratios to it.

A value changes which Linear and conv calls keep their per-example gradients for a
clipped sum (materialise) and which take the T×T Grams and a weighted matmul (ghost);
values that make the same choices time alike. Rounds alternate the order of the values,
so that neither gains from running right after the plain step.

    python benchmarks/pass_cost.py                         # the GPT, 20 and 38
    python benchmarks/pass_cost.py --costs 20,38,41,50 --rounds 150
"""

from __future__ import annotations

import argparse
import statistics
import time

from indigrad import bench
from indigrad.bench.methods import METHODS
from indigrad.rules import _cost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problem", default="gpt")
    parser.add_argument("--costs", default="20,38")
    parser.add_argument("--rounds", type=int, default=60)
    args = parser.parse_args()
    problem = bench.zoo("cpu")[args.problem]()
    costs = [float(c) for c in args.costs.split(",")]
    plain, clipped = METHODS["plain"](problem), METHODS["clipped"](problem)
    times: dict[float | None, list[float]] = {None: [], **{c: [] for c in costs}}
    saved = _cost._PASS_COST.get("cpu")
    try:
        for r in range(args.rounds + 3):  # the first three rounds warm up
            order = costs if r % 2 == 0 else costs[::-1]
            for cost in [None, *order]:
                if cost is not None:
                    _cost._PASS_COST["cpu"] = cost
                start = time.perf_counter()
                (plain if cost is None else clipped)()
                if r >= 3:
                    times[cost].append(time.perf_counter() - start)
    finally:
        if saved is not None:
            _cost._PASS_COST["cpu"] = saved
    base = statistics.median(times[None])
    print(f"{problem.name}, plain step {base * 1e3:.1f} ms; clipped step, × plain:")
    for cost in costs:
        print(f"  pass cost {cost:g}: {statistics.median(times[cost]) / base:.3f}×")


if __name__ == "__main__":
    main()
