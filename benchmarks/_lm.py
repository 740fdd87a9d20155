"""What the language-model scripts (``tied_gpt2.py``, ``scaled_embedding.py``) share:
their options, and their two ways to run a problem."""

from __future__ import annotations

import argparse
import resource

from indigrad import bench
from indigrad.bench.methods import METHODS


def parser(doc: str, d: int, vocab: int, repeats: int) -> argparse.ArgumentParser:
    """The options ``--d --vocab --T --n --repeats --device --rss``, with these defaults."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--d", type=int, default=d)
    p.add_argument("--vocab", type=int, default=vocab)
    p.add_argument("--T", type=int, default=64)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--device", default="cpu")
    p.add_argument("--rss", action="store_true", help="peak memory of clipped steps")
    return p


def run(problem: bench.Problem, rss: bool, repeats: int) -> None:
    """Print indigrad's methods timed against plain, or with ``rss`` how far three clipped
    steps raised the process's peak resident memory over the model's (CPU)."""
    if rss:
        step = METHODS["clipped"](problem)  # builds the model: its memory is the baseline
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        for _ in range(3):
            step()
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024  # MiB
        print(f"{problem.name}: 3 clipped steps raised the peak resident memory by {grown} MiB")
        return
    results = bench.run(problem, ["plain", "norms", "clipped", "grads"], repeats=repeats)
    print(bench.table(problem, results))
