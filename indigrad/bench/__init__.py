"""Whole-step timing of indigrad against plain training and peer libraries, in one
process, as ratios to the plain step (``indigrad bench``, ``benchmarks/``).

Every method times what a user runs per batch: the forward, the backward work, and (for
steps) ``optimizer.step()``. Methods are timed round-robin, one step each per round, and
the median is reported, so that a drift of the machine affects them all alike. On CUDA
each step ends with a synchronisation, and its memory is the peak allocated during the
step above what was allocated before it.

Example (tiny, so it runs in a doctest):
    >>> import indigrad.bench as bench
    >>> problem = bench.mlp_problem(8, [8], 2, batch=4)
    >>> results = bench.run(problem, ["plain", "norms"], repeats=2, warmup=1)
    >>> sorted(results), results["plain"]["ratio"]
    (['norms', 'plain'], 1.0)
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .methods import METHODS, graphed
from .problems import (
    MLP,
    Problem,
    by_name,
    cnn_problem,
    convnext_problem,
    extras,
    gpt_problem,
    lstm_problem,
    mlp_problem,
    resnet18_problem,
    seq2seq_problem,
    vit_problem,
    zoo,
)

__all__ = [
    "METHODS",
    "MLP",
    "Problem",
    "by_name",
    "cnn_problem",
    "convnext_problem",
    "count_ops",
    "extras",
    "gpt_problem",
    "lstm_problem",
    "machine",
    "mlp_problem",
    "plot",
    "resnet18_problem",
    "run",
    "seq2seq_problem",
    "table",
    "vit_problem",
    "zoo",
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(
    problem: Problem,
    methods: Sequence[str],
    repeats: int = 20,
    warmup: int = 3,
    progress: Callable[[str], None] | None = None,
    ops: bool = False,
    graphs: bool = False,
) -> dict[str, dict[str, Any]]:
    """Median seconds per step of each method on ``problem``, and the ratio to ``plain``
    (timed too if not asked for). The per-example loop is slow by design and runs in
    every tenth round only. A method that raises is reported with its error.

    With ``ops``, one more untimed step of each method counts the ATen operators
    it calls (:func:`count_ops`): on a GPU whose step is bound by the host, their number
    sets the time more than their arithmetic does.

    With ``graphs`` (CUDA), every method, plain included, is captured as a CUDA graph
    (:func:`~indigrad.bench.methods.graphed`) and each step replays it: the ratios are then
    those of the device's work alone, without the host's. No memory is reported then (a
    replay allocates nothing; the graph holds its memory from the capture on)."""
    order = ["plain", *[m for m in methods if m != "plain"]]
    device = problem.device
    cuda = device.type == "cuda"
    if graphs and not cuda:
        raise ValueError(f"CUDA graphs need a CUDA device; the problem is on {device.type}")
    steps: dict[str, Callable[[], None]] = {}
    errors: dict[str, str] = {}
    times: dict[str, list[float]] = {m: [] for m in order}
    memory: dict[str, int] = {}
    faults: dict[str, list[int]] = {m: [] for m in order}
    op_counts: dict[str, dict[str, int]] = {}

    def timed(method: str, record: bool = True) -> float:
        if cuda:
            _sync(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        start_faults = _minor_faults()
        start = time.perf_counter()
        steps[method]()
        _sync(device)
        elapsed = time.perf_counter() - start
        if cuda and not graphs and record:  # not in the warm-up, whose first step is checked
            used = torch.cuda.max_memory_allocated(device) - before
            memory[method] = max(memory.get(method, 0), used)
        elif start_faults is not None:
            faults[method].append(_minor_faults() - start_faults)  # type: ignore[operator]
        return elapsed

    with warnings.catch_warnings():
        # peers warn on every step (Opacus' backward hooks, say); indigrad's own still show
        warnings.simplefilter("ignore")
        warnings.filterwarnings("default", module=r"indigrad(?!\.bench)")
        for method in order:
            if progress is not None:
                progress(f"{method}: warm-up")
            try:
                steps[method] = METHODS[method](problem)
                if graphs:
                    if ops:  # eagerly, before the capture: a replay dispatches no operator
                        steps[method]()
                        op_counts[method] = count_ops(steps[method])
                    steps[method] = graphed(steps[method], device)
                for _ in range(warmup):
                    timed(method, record=False)
                if ops and not graphs:
                    op_counts[method] = count_ops(steps[method])
            except Exception as err:  # a method that crashes is reported, not hidden
                errors[method] = f"{type(err).__name__}: {err}".split("\n")[0]
                steps.pop(method, None)
        for r in range(repeats):
            if progress is not None:
                progress(f"round {r + 1}/{repeats}")
            for method in steps:
                if method == "loop" and r % 10:
                    continue
                times[method].append(timed(method))
    results: dict[str, dict[str, Any]] = {}
    for method in order:
        if method in errors:
            results[method] = {"error": errors[method]}
            continue
        results[method] = {
            "seconds": statistics.median(times[method]),
            "repeats": len(times[method]),
        }
        if graphs:
            results[method]["graphed"] = True
        if method in memory:
            results[method]["step_bytes"] = memory[method]
        if faults[method]:  # CPU: pages mapped on first touch (fresh memory) per step
            results[method]["page_faults"] = statistics.median(faults[method])
        if method in op_counts:
            results[method]["ops"] = op_counts[method]
    base = results["plain"]
    for res in results.values():
        if "seconds" in res and "seconds" in base:
            res["ratio"] = res["seconds"] / base["seconds"]
        if "step_bytes" in res and base.get("step_bytes"):
            res["memory_ratio"] = res["step_bytes"] / base["step_bytes"]
    if "plain" not in methods:
        results.pop("plain")
    return results


def machine(device: str | torch.device = "cpu") -> str:
    """What the figures were measured on: the CPU's model, the threads torch uses and the
    vector instructions its kernels take, and on CUDA the device. Ratios to plain training
    depend on it (ResNet-18's `grads` took 1.08× and 2.31× plain on two 2-core machines).

    Example:
        >>> "threads" in machine("cpu")
        True
    """
    cpu = _cpu_model()
    isa = torch.backends.cpu.get_cpu_capability()
    text = f"{cpu}, {torch.get_num_threads()} threads, {isa}"
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        text = f"{props.name}, {props.total_memory / 2**30:.0f} GiB; host {text}"
    return text


def _cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else the platform's word."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def table(problem: Problem, results: dict[str, dict[str, Any]]) -> str:
    """A plain-text table of ``run``'s results: on CUDA with the peak memory of a step
    over plain's, on CPU with the minor page faults of a step (fresh memory touched)."""
    graphs = ", CUDA graphs" if any(r.get("graphed") for r in results.values()) else ""
    lines = [f"{problem.name} on {problem.device.type}{graphs}, torch {torch.__version__}"]
    memory = any("memory_ratio" in r for r in results.values())
    faults = any("page_faults" in r for r in results.values())
    extra = "  memory" if memory else "  faults/step" if faults else ""
    counted = any("ops" in r for r in results.values())
    extra += "  ops (not views)/step" if counted else ""
    lines.append(f"{'method':<15} {'ms/step':>10} {'× plain':>9}" + extra)
    for method, r in results.items():
        if "error" in r:
            lines.append(f"{method:<15} {'fails':>10}   {r['error'][:70]}")
            continue
        line = f"{method:<15} {r['seconds'] * 1e3:>10.2f} {r['ratio']:>8.2f}×"
        if "memory_ratio" in r:
            line += f"  {r['memory_ratio']:>5.2f}×"
        elif "page_faults" in r:
            line += f"  {r['page_faults']:>11.0f}"
        if "ops" in r:
            line += f"  {r['ops']['all']:>6} ({r['ops']['all'] - r['ops']['views']})"
        elif counted:
            line += f"  {'?':>6}"
        lines.append(line)
    return "\n".join(lines)


def count_ops(step: Callable[[], None]) -> dict[str, int]:
    """ATen operators one call of ``step`` dispatches: ``all`` of them, and the ``views``
    among them (which launch no kernel on a GPU).

    Example:
        >>> import torch
        >>> x = torch.ones(3)
        >>> count_ops(lambda: (x * 2).view(3, 1).sum())
        {'all': 3, 'views': 1}
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    counts = {"all": 0, "views": 0}

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counts["all"] += 1
            counts["views"] += bool(func.is_view)
            return func(*args, **(kwargs or {}))

    with Count():
        step()
    return counts


def _minor_faults() -> int | None:
    """This process's minor page faults so far (None where ``resource`` is missing)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def plot(report: dict[str, dict[str, dict[str, Any]]], path: str) -> None:
    """A bar chart of the ratios to plain: one group per problem, one bar per method
    (log scale; a method that failed is marked ✗)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = list(report)
    methods = [m for m in dict.fromkeys(m for r in report.values() for m in r) if m != "plain"]
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(8, 2.2 * len(problems)), 4.5))
    for j, method in enumerate(methods):
        for i, problem in enumerate(problems):
            r = report[problem].get(method, {})
            x = i + (j - (len(methods) - 1) / 2) * width
            if "ratio" in r:
                ax.bar(x, r["ratio"], width, color=f"C{j % 10}", label=method if i == 0 else None)
            elif "error" in r:
                ax.text(x, 1, "✗", ha="center", va="bottom", color=f"C{j % 10}")
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xticks(range(len(problems)), problems, fontsize=8)
    ax.set_ylabel("time per step / plain step")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
