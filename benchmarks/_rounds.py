"""What the scripts that time steps side by side share: round-robin rounds.

Timings of separate processes, or of one step timed in a block and another after it,
differ with the machine's drift; taken in turn, one step each per round, they drift
alike. ``against.py``, ``host_threads.py`` and ``bptt_loops.py`` time so.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def interleaved(
    steps: dict[str, Callable[[], object]],
    rounds: int,
    warmup: int = 3,
    cuda: bool = False,
    alternate: bool = False,
) -> dict[str, float]:
    """The median seconds of each step over ``rounds`` rounds, after ``warmup`` more,
    one call of each step per round, in turn (``alternate``: in reverse order every other
    round, the first reversed). With ``cuda``, each call is timed until the device has
    finished it.

    Example:
        >>> medians = interleaved({"a": lambda: sum(range(100)), "b": lambda: None}, rounds=5)
        >>> sorted(medians), all(s >= 0 for s in medians.values())
        (['a', 'b'], True)
    """
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + rounds):
        for name in names[::-1] if alternate and r % 2 == 0 else names:
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            steps[name]()
            if cuda:
                torch.cuda.synchronize()
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}
