"""One method's steps back to back, in a process of their own, as a training loop runs them.

``against.py`` interleaves revisions and methods in one process, so that the machine's
drift hits them alike; but which allocations of a CPU step find freed pages, and which
fault fresh ones in (``indigrad bench`` prints the faults), depends on what ran before,
and seven steps of different shapes in turn make that vary from run to run. Here one
method runs ``--steps`` times in a row after a warm-up, nothing between, and the median
step and its minor page faults are printed; ``--rounds`` fresh processes per method and
revision, alternated.

    python benchmarks/alone.py 5fbe830 --problem cnn --methods plain,norms,clipped,grads
    python benchmarks/alone.py --base DIR --problem cnn     # DIR/indigrad_base (against.py)
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def child(base: str | None, problem_name: str, method: str, steps: int) -> dict[str, float]:
    """Run in the child process: ``steps`` steps of ``method``, the median ms and faults."""
    import torch
    from against import train_step

    from indigrad import bench

    if base is not None:
        sys.path.insert(0, base)
    package: Any = importlib.import_module("indigrad_base" if base else "indigrad")
    torch.manual_seed(0)
    problem = bench.by_name(problem_name)
    model, x, y, loss = problem.model(), problem.x, problem.y, problem.loss
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    step = functools.partial(train_step, package, method, model=model, x=x, y=y, loss=loss, opt=opt)

    for _ in range(5):
        step()
    times, faults = [], []
    for _ in range(steps):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return {"ms": statistics.median(times) * 1e3, "faults": statistics.median(faults)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("rev", nargs="?", help="the other revision (git)")
    parser.add_argument("--base", type=Path, help="a folder holding indigrad_base instead")
    parser.add_argument("--problem", default="cnn")
    parser.add_argument("--methods", default="plain,norms,clipped,grads")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        base, problem, method, steps = args.child
        print(json.dumps(child(base or None, problem, method, int(steps))))
        return
    base = args.base
    if args.rev:
        sys.path.insert(0, str(HERE))
        from against import export

        base = Path(tempfile.mkdtemp())
        export(args.rev, base)
    label = args.rev or (str(args.base) if args.base else None)
    revisions = ([(label, str(base))] if base else []) + [("this tree", "")]
    for _ in range(args.rounds):
        for method in args.methods.split(","):
            for name, where in revisions if method != "plain" else [("", "")]:
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        where,
                        args.problem,
                        method,
                        str(args.steps),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                r = json.loads(out.splitlines()[-1])
                tag = f"{method} ({name})" if name else method
                print(f"  {tag:<28} {r['ms']:9.2f} ms  {r['faults']:8.0f} faults/step", flush=True)
        print(flush=True)


if __name__ == "__main__":
    main()
